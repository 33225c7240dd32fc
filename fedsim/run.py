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
import sys
import time
from typing import Any, Callable

import yaml

from fedsim.config import Scenario, to_dict
from fedsim.types import Engine

def _unique_dir(base: str, name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(base, f"{name}-{stamp}")
    k = 2
    while os.path.exists(path) or os.path.exists(path + ".partial"):
        path = os.path.join(base, f"{name}-{stamp}-{k}")
        k += 1
    return path


class RunWriter:
    """Streams metrics to a run folder; `close` finalises it atomically."""

    def __init__(self, sc: Scenario, out_dir: str | None = None) -> None:
        self.final = _unique_dir(out_dir or sc.output.dir, sc.name)
        self.path = self.final + ".partial"
        os.makedirs(self.path)
        with open(os.path.join(self.path, "config.yaml"), "w", encoding="utf-8") as fh:
            yaml.safe_dump(to_dict(sc), fh, sort_keys=False)
        self._metrics = open(os.path.join(self.path, "metrics.jsonl"), "w", encoding="utf-8")
        self.history: list[dict[str, Any]] = []

    def log(self, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)
        self._metrics.write(json.dumps(metrics, sort_keys=False) + "\n")
        self._metrics.flush()

    def close(self, summary: dict[str, Any], ok: bool) -> str:
        self._metrics.close()
        with open(os.path.join(self.path, "summary.json"), "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
        if ok:
            os.replace(self.path, self.final)
            return self.final
        return self.path


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
        "wall_s": round(wall_s, 4), "seed": sc.seed, "strategy": sc.strategy.name,
        "engine": sc.engine.kind, "device": sc.engine.device, "rounds": sc.rounds,
        "clients": sc.data.clients, **extra,
    }


def execute(sc: Scenario, out_dir: str | None = None, quiet: bool = False,
            write: bool = True) -> tuple[str | None, dict[str, Any]]:
    """Run scenario `sc` with its engine; returns (run folder or None, summary)."""
    from fedsim.engines import ENGINES
    from fedsim.setup import build_setup

    t_start = time.perf_counter()
    setup = build_setup(sc)
    engine: Engine = ENGINES.build(sc.engine.kind, sc.engine.params())
    writer = RunWriter(sc, out_dir) if write and engine.is_root else None
    history: list[dict[str, Any]] = []
    on_eval = writer.log if writer else history.append
    update, close_bar = _progress(sc.rounds, quiet or not engine.is_root)
    engine.prepare(setup)  # data placement etc.: part of set-up, not of the timed rounds
    extra = {"params": setup.model.spec.size, "setup_s": round(time.perf_counter() - t_start, 4)}
    t0 = time.perf_counter()
    try:
        engine.run(setup, on_eval, update)
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
