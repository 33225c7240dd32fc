"""A run: validate, build, execute with the chosen engine, and write the run folder.

Run folder ``<output.dir>/<name>-<YYYYmmdd-HHMMSS>/``:
  config.yaml    the fully resolved scenario (defaults filled)
  metrics.jsonl  one JSON object per evaluation
  summary.json   final metrics, totals, seed, strategy, engine, status
The folder is written under a ``.partial`` name and renamed only when the run succeeds, so a
crash never leaves something that looks like a finished run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import yaml

from fedsim import checkpoint as ckpt
from fedsim.config import Scenario, to_dict
from fedsim.errors import ConfigError, RunDiverged, RunInterrupted
from fedsim.provenance import provenance
from fedsim.run_checks import Diverged, EtaWarning, check_finite, json_safe
from fedsim.trackers import check_trackers, open_trackers
from fedsim.types import Engine


def _new_folder(base: str, name: str) -> str:
    """Create ``<base>/<name>-<stamp>[-k].partial`` atomically (concurrent runs never collide)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        os.makedirs(base, exist_ok=True)
        if not os.access(base, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable")
    except OSError as exc:
        raise ConfigError(f"cannot create run folders here: {exc.strerror or exc}", key="--out / output.dir",
                          value=base, allowed="a writable directory (or a path where one can be made)"
                          ) from None
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
    """Strict JSON (non-finite floats as null), written whole or not at all."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(json_safe(obj), fh, indent=2, allow_nan=False)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None


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
        _write_text(os.path.join(self.path, "config.yaml"), yaml.safe_dump(to_dict(sc), sort_keys=False))
        self.metrics_path = os.path.join(self.path, "metrics.jsonl")
        _write_text(self.metrics_path, "".join(lines))
        self._fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND)
        self._size = os.fstat(self._fd).st_size
        self.history: list[dict[str, Any]] = [json.loads(line) for line in lines]

    def log(self, metrics: dict[str, Any]) -> None:
        """Append one metrics line (non-finite floats as null). A write that does not complete
        (disk full, file-size limit) is cut back to the last whole line and raises OSError
        naming the file."""
        metrics = json_safe(metrics)
        line = (json.dumps(metrics, sort_keys=False, allow_nan=False) + "\n").encode()
        try:
            n = os.write(self._fd, line)
            if n != len(line):
                raise OSError(errno.ENOSPC, f"only {n} of {len(line)} bytes written")
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise OSError(exc.errno, f"cannot write {self.metrics_path}: "
                          f"{exc.strerror or os.strerror(exc.errno or 0)}") from None
        self._size += n
        self.history.append(metrics)
        self.trackers.log(metrics)

    def close(self, summary: dict[str, Any], ok: bool) -> str:
        os.close(self._fd)
        ckpt.settle()  # no checkpoint folder is being removed while the run folder is renamed
        self.trackers.close(summary, ok)
        _write_json(os.path.join(self.path, "summary.json"), summary)
        if ok and self.path != self.final:
            os.replace(self.path, self.final)
            return self.final
        return self.path


def _write_text(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None


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
        "best_test_accuracy": max((h["test_accuracy"] for h in history
                                   if h.get("test_accuracy") is not None), default=None),
        "bytes_up": last.get("bytes_up", 0), "bytes_down": last.get("bytes_down", 0),
        "sim_time_s": last.get("sim_time_s"), "wall_s": round(wall_s, 4), "seed": sc.seed,
        "strategy": sc.strategy.name,
        "engine": sc.engine.kind, "device": sc.engine.device, "rounds": sc.rounds,
        "clients": sc.data.clients, **extra, "provenance": provenance(sc.engine.device, sc.source),
    }


WATCHED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals that stop a run (SIGHUP and SIGTERM: what batch schedulers send)."""


@contextlib.contextmanager
def signals_restored(sigs: tuple[int, ...] = WATCHED) -> Iterator[list[int]]:
    """Put the handlers of `sigs` back on exit, also when the body raises; yields the signals it
    can put back, which are the only ones a caller may change: none off the main thread, and
    not one whose handler a native library installed (`signal.getsignal` gives None: Python
    cannot restore it). Around fedsim's run handlers, and around Flower's `run_simulation`
    (Ray's `init` sets its own SIGTERM handler and never puts the old one back)."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    old = {sig: handler for sig in sigs if (handler := signal.getsignal(sig)) is not None}
    try:
        yield list(old)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class _Signals:
    """SIGINT, SIGTERM and SIGHUP (what batch schedulers send) ask the run to stop at the end of
    the current round; a second SIGINT stops at once (KeyboardInterrupt). The handlers found
    are put back on exit (`signals_restored`)."""

    def __init__(self) -> None:
        self.received = 0
        self._stack = contextlib.ExitStack()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def __enter__(self) -> _Signals:
        try:
            for sig in self._stack.enter_context(signals_restored()):
                signal.signal(sig, self._handle)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


def _close_failed(writer: RunWriter | None, sc: Scenario, t0: float, extra: dict[str, Any]) -> None:
    """Write the summary of a run that did not finish (the folder keeps its .partial name); a
    failure to write it (a full disk) never hides the error that ended the run."""
    if writer is None:
        return
    with contextlib.suppress(OSError):
        writer.close(summarize(sc, writer.history, time.perf_counter() - t0, extra), ok=False)


def execute(sc: Scenario, out_dir: str | None = None, quiet: bool = False,
            write: bool = True, resume: str | None = None) -> tuple[str | None, dict[str, Any]]:
    """Run scenario `sc` with its engine; returns (run folder or None, summary).

    Checkpoints go into the run folder (`checkpoint.every`); `resume` is a run folder to
    continue from its latest checkpoint (`fedsim resume`). On SIGINT / SIGTERM / SIGHUP the run
    finishes its round, checkpoints, marks the summary interrupted and raises `RunInterrupted`.
    """
    from fedsim.engines import ENGINES
    from fedsim.setup import build_setup
    from fedsim.setup_checks import check_model_fits

    t_start = time.perf_counter()
    setup = build_setup(sc)
    check_model_fits(setup)  # as `fedsim validate`: a model that does not fit the data is bad input
    engine: Engine = ENGINES.build(sc.engine.kind, sc.engine.params())
    point = ckpt.latest(resume) if resume is not None else None
    fingerprint = ckpt.digest(to_dict(sc))
    state = ckpt.read(point, fingerprint) if point is not None else None
    engine.prepare(setup)  # data placement and engine checks: set-up, before any folder exists
    writer = None
    if write and engine.is_root:
        writer = (RunWriter(sc, folder=resume, keep_lines=int(state["lines"])) if state is not None
                  else RunWriter(sc, out_dir))
    history: list[dict[str, Any]] = []
    sink = writer.log if writer else history.append

    def on_eval(m: dict[str, Any]) -> None:
        try:
            check_finite(m, setup.dataset.num_classes)
        finally:
            sink(m)  # the diverged line too, its non-finite values as null

    update, close_bar = _progress(sc.rounds, quiet or not engine.is_root)
    eta = EtaWarning(sc.rounds - (int(state["round"]) if state is not None else 0))

    def progress(t: int, m: dict[str, Any] | None) -> None:
        update(t, m)
        if engine.is_root:
            eta.round_done()

    extra = {"params": setup.model.spec.size, "setup_s": round(time.perf_counter() - t_start, 4)}
    t0 = time.perf_counter()
    with _Signals() as signals:
        control = ckpt.Control(folder=writer.path if writer else "", digest=fingerprint,
                               every=ckpt.every(sc.rounds, sc.checkpoint.every),
                               lines=lambda: len(writer.history) if writer else 0,
                               signal=lambda: signals.received, resume=point)
        try:
            engine.run(setup, on_eval, progress, control if write else None)
        except ckpt.Interrupted as stop:
            close_bar()
            path = control.folder or None  # every MPI rank knows the folder
            if writer:
                writer.close(summarize(sc, writer.history, time.perf_counter() - t0,
                                       {**extra, "status": "interrupted", "round": stop.round}), ok=False)
            raise RunInterrupted(128 + stop.signum, f"interrupted by signal {stop.signum} after round "
                                 f"{stop.round}; continue with: fedsim resume {path}") from None
        except Diverged as div:
            close_bar()
            _close_failed(writer, sc, t0, {**extra, "status": "diverged", "diverged_round": div.round,
                                           "error": str(div)})
            where = f" (run folder {writer.path})" if writer else ""
            raise RunDiverged(f"{div}{where}") from None
        except BaseException as exc:
            close_bar()
            _close_failed(writer, sc, t0, {**extra, "status": "failed",
                                           "error": f"{type(exc).__name__}: {exc}"})
            raise
    close_bar()
    extra.update(engine.summary_extra())
    hist = writer.history if writer else history
    summary = summarize(sc, hist, time.perf_counter() - t0, extra)
    path = writer.close(summary, ok=True) if writer else None
    return path, summary
