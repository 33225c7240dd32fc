"""Guards of a running run: finite metrics (divergence), strict JSON, an ETA warning.

* **Divergence.** A metrics line whose train or test loss is NaN or infinite, or whose test
  loss exceeds `EXPLODED` x ln C (ln C is the cross-entropy of a uniform guess over C classes:
  a trained or even an untrained model stays far below), means the model blew up (a step size
  too large for the problem; with ReLU units an exploded model can stay finite, `lr: 1e6` on
  the quickstart ends at test loss ~2e5). The run stops at that evaluation: the line is written
  with ``null`` for the non-finite values, ``summary.json`` gets ``status: diverged`` and
  ``diverged_round``, and the command exits 1 with one line (`Diverged`).
* **Strict JSON.** ``json.dumps`` writes bare ``NaN`` / ``Infinity`` tokens, which most JSON
  parsers refuse; `json_safe` turns every non-finite float into ``None`` first.
* **ETA.** After the first rounds the projected remaining host time is checked once; a run that
  will take more than `ETA_WARN_S` prints one warning line (it is not stopped).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

LOSS_KEYS = ("train_loss", "test_loss")
EXPLODED = 1000.0
"""A test loss above EXPLODED x ln(classes) counts as diverged."""
ETA_WARN_S = 24 * 3600.0
"""Projected host seconds above which a run prints a warning (a day)."""


class Diverged(Exception):
    """Raised by `check_finite`: the losses of round `round` are not finite (`keys`)."""

    def __init__(self, round: int, keys: list[str], why: str = "not finite (NaN or inf)") -> None:
        self.round, self.keys = round, keys
        super().__init__(f"diverged at round {round}: {', '.join(keys)} {why}; "
                         "lower the step size (strategy.lr) or check the data")


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN / inf float (also inside lists and dicts) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def non_finite(metrics: dict[str, Any]) -> list[str]:
    """The loss keys of a metrics line whose value is a non-finite float."""
    return [k for k in LOSS_KEYS
            if isinstance(metrics.get(k), float) and not math.isfinite(metrics[k])]


def check_finite(metrics: dict[str, Any], num_classes: int = 2) -> None:
    """Raise `Diverged` when a loss of the line is NaN or infinite, or the test loss exploded
    (above `EXPLODED` x ln(num_classes))."""
    bad = non_finite(metrics)
    if bad:
        raise Diverged(int(metrics.get("round", 0)), bad)
    limit = EXPLODED * math.log(max(num_classes, 2))
    test = metrics.get("test_loss")
    if isinstance(test, float) and test > limit:
        raise Diverged(int(metrics.get("round", 0)), ["test_loss"],
                       f"= {test:.4g}, over {EXPLODED:g} x ln({num_classes}) = {limit:.4g} (a uniform "
                       f"guess scores ln({num_classes}))")


def format_duration(seconds: float) -> str:
    """'3.2 days', '5.0 hours', '12 minutes'."""
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.0f} minutes"


class EtaWarning:
    """Warns once when the rounds done so far project a run longer than `limit_s` seconds.

    `clock` returns seconds (injected in tests); the check runs after `after` rounds, once.
    """

    def __init__(self, rounds: int, *, limit_s: float = ETA_WARN_S, after: int = 2,
                 clock: Callable[[], float] = time.perf_counter, stream: TextIO | None = None) -> None:
        self.rounds, self.limit_s, self.after, self.clock = rounds, limit_s, after, clock
        self.stream = stream
        self.t0 = clock()
        self.done = 0
        self.warned: str | None = None

    def round_done(self) -> None:
        self.done += 1
        if self.done != min(self.after, self.rounds) or self.warned is not None:
            return
        per_round = (self.clock() - self.t0) / self.done
        eta = per_round * (self.rounds - self.done)
        if eta > self.limit_s:
            self.warned = (f"warning: {self.rounds} rounds at {per_round:.3g} s per round will take "
                           f"about {format_duration(eta)} more (lower rounds, or stop with Ctrl-C: "
                           "the run checkpoints and `fedsim resume` continues it)")
            print(self.warned, file=self.stream or sys.stderr, flush=True)
