"""A run: validate, build, execute with the chosen engine, and write the run folder.

Run folder ``<output.dir>/<name>-<YYYYmmdd-HHMMSS>/``:
  config.yaml    the fully resolved scenario (defaults filled)
  metrics.jsonl  one JSON object per evaluation
  summary.json   final metrics, totals, seed, strategy, engine, status
The folder is written under a ``.partial`` name and renamed only when the run succeeds, so a
crash never leaves something that looks like a finished run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import yaml

from fedsim import checkpoint as ckpt
from fedsim.config import Scenario, to_dict
from fedsim.errors import RunInterrupted
from fedsim.provenance import provenance
from fedsim.trackers import check_trackers, open_trackers
from fedsim.types import Engine


def _new_folder(base: str, name: str) -> str:
    """Create ``<base>/<name>-<stamp>[-k].partial`` atomically (concurrent runs never collide)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(base, exist_ok=True)
    for k in range(1, 10_000):
        final = os.path.join(base, f"{name}-{stamp}" + (f"-{k}" if k > 1 else ""))
        if os.path.exists(final):
            continue
        try:
            os.mkdir(final + ".partial")
        except FileExistsError:
            continue
        return final
    raise RuntimeError(f"no free run-folder name for {name!r} in {base}")


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


class RunWriter:
    """Streams metrics to a run folder; `close` finalises it atomically.

    Metrics lines are appended with one `write` each (whole lines, even if the process is
    killed); `reopen` continues a run folder from a checkpoint, keeping its first lines.
    """

    def __init__(self, sc: Scenario, out_dir: str | None = None, *, folder: str | None = None,
                 keep_lines: int = 0) -> None:
        check_trackers(sc)
        if folder is None:
            self.final = _new_folder(out_dir or sc.output.dir, sc.name)
            self.path = self.final + ".partial"
            lines: list[str] = []
        else:
            self.path = folder
            self.final = folder.removesuffix(".partial")
            lines = _read_lines(os.path.join(folder, "metrics.jsonl"))[:keep_lines]
        self.trackers = open_trackers(sc, self.path, self.final, os.path.dirname(self.final))
        with open(os.path.join(self.path, "config.yaml"), "w", encoding="utf-8") as fh:
            yaml.safe_dump(to_dict(sc), fh, sort_keys=False)
        self.metrics_path = os.path.join(self.path, "metrics.jsonl")
        with open(self.metrics_path, "w", encoding="utf-8") as fh:
            fh.writelines(lines)
        self._fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND)
        self.history: list[dict[str, Any]] = [json.loads(line) for line in lines]

    def log(self, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)
        line = (json.dumps(metrics, sort_keys=False) + "\n").encode()
        try:
            os.write(self._fd, line)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write {self.metrics_path}: {exc.strerror}") from None
        self.trackers.log(metrics)

    def close(self, summary: dict[str, Any], ok: bool) -> str:
        os.close(self._fd)
        self.trackers.close(summary, ok)
        _write_json(os.path.join(self.path, "summary.json"), summary)
        if ok and self.path != self.final:
            os.replace(self.path, self.final)
            return self.final
        return self.path


def _read_lines(path: str) -> list[str]:
    """The whole JSON lines of a metrics file (a cut last line is dropped)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    return [ln for ln in lines if ln.endswith("\n")]


def _progress(total: int, quiet: bool) -> tuple[Callable[[int, dict | None], None], Callable[[], None]]:
    if quiet:
        return (lambda t, m: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, desc="round", unit="rd", file=sys.stderr, dynamic_ncols=True,
               leave=True)

    def update(t: int, m: dict | None) -> None:
        if m is not None:
            post = {"loss": m.get("train_loss"), "acc": m.get("test_accuracy")}
            bar.set_postfix({k: f"{v:.4f}" for k, v in post.items() if v is not None}, refresh=False)
        bar.update(1)
    return update, bar.close


def summarize(sc: Scenario, history: list[dict[str, Any]], wall_s: float, extra: dict[str, Any]) -> dict:
    last = history[-1] if history else {}
    return {
        "name": sc.name, "status": extra.pop("status", "ok"),
        "final": {k: last.get(k) for k in ("round", "train_loss", "test_loss", "test_accuracy")},
        "best_test_accuracy": max((h["test_accuracy"] for h in history), default=None),
        "bytes_up": last.get("bytes_up", 0), "bytes_down": last.get("bytes_down", 0),
        "sim_time_s": last.get("sim_time_s"), "wall_s": round(wall_s, 4), "seed": sc.seed,
        "strategy": sc.strategy.name,
        "engine": sc.engine.kind, "device": sc.engine.device, "rounds": sc.rounds,
        "clients": sc.data.clients, **extra, "provenance": provenance(sc.engine.device, sc.source),
    }


class _Signals:
    """SIGINT, SIGTERM and SIGHUP (what batch schedulers send) ask the run to stop at the end of
    the current round; a second SIGINT stops at once (KeyboardInterrupt)."""

    WATCHED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received = 0
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def __enter__(self) -> _Signals:
        for sig in self.WATCHED:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (embedded use): no handlers
                break
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def execute(sc: Scenario, out_dir: str | None = None, quiet: bool = False,
            write: bool = True, resume: str | None = None) -> tuple[str | None, dict[str, Any]]:
    """Run scenario `sc` with its engine; returns (run folder or None, summary).

    Checkpoints go into the run folder (`checkpoint.every`); `resume` is a run folder to
    continue from its latest checkpoint (`fedsim resume`). On SIGINT / SIGTERM / SIGHUP the run
    finishes its round, checkpoints, marks the summary interrupted and raises `RunInterrupted`.
    """
    from fedsim.engines import ENGINES
    from fedsim.setup import build_setup

    t_start = time.perf_counter()
    setup = build_setup(sc)
    engine: Engine = ENGINES.build(sc.engine.kind, sc.engine.params())
    point = ckpt.latest(resume) if resume is not None else None
    fingerprint = ckpt.digest(to_dict(sc))
    state = ckpt.read(point, fingerprint) if point is not None else None
    writer = None
    if write and engine.is_root:
        writer = (RunWriter(sc, folder=resume, keep_lines=int(state["lines"])) if state is not None
                  else RunWriter(sc, out_dir))
    history: list[dict[str, Any]] = []
    on_eval = writer.log if writer else history.append
    update, close_bar = _progress(sc.rounds, quiet or not engine.is_root)
    engine.prepare(setup)  # data placement etc.: part of set-up, not of the timed rounds
    extra = {"params": setup.model.spec.size, "setup_s": round(time.perf_counter() - t_start, 4)}
    t0 = time.perf_counter()
    with _Signals() as signals:
        control = ckpt.Control(folder=writer.path if writer else "", digest=fingerprint,
                               every=ckpt.every(sc.rounds, sc.checkpoint.every),
                               lines=lambda: len(writer.history) if writer else 0,
                               signal=lambda: signals.received, resume=point)
        try:
            engine.run(setup, on_eval, update, control if write else None)
        except ckpt.Interrupted as stop:
            close_bar()
            path = control.folder or None  # every MPI rank knows the folder
            if writer:
                writer.close(summarize(sc, writer.history, time.perf_counter() - t0,
                                       {**extra, "status": "interrupted", "round": stop.round}), ok=False)
            raise RunInterrupted(128 + stop.signum, f"interrupted by signal {stop.signum} after round "
                                 f"{stop.round}; continue with: fedsim resume {path}") from None
        except BaseException as exc:
            close_bar()
            if writer:
                summary = summarize(sc, writer.history, time.perf_counter() - t0,
                                    {**extra, "status": "failed", "error": f"{type(exc).__name__}: {exc}"})
                writer.close(summary, ok=False)
            raise
    close_bar()
    extra.update(engine.summary_extra())
    hist = writer.history if writer else history
    summary = summarize(sc, hist, time.perf_counter() - t0, extra)
    path = writer.close(summary, ok=True) if writer else None
    return path, summary
