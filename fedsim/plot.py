"""`fedsim plot` and `fedsim compare`: read run folders, overlay curves, tabulate finals."""

from __future__ import annotations

import json
import os
from typing import Any

from fedsim.errors import ConfigError


def read_run(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, metrics rows) of a run folder; ConfigError if it is not one."""
    summ, met = os.path.join(path, "summary.json"), os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(met):
        raise ConfigError("not a run folder (no metrics.jsonl)", file=path)
    rows = []
    with open(met, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ConfigError(f"line {i} is not JSON", file=met) from None
    summary: dict[str, Any] = {}
    if os.path.isfile(summ):
        with open(summ, encoding="utf-8") as fh:
            summary = json.load(fh)
    return summary, rows


def _label(path: str, summary: dict[str, Any]) -> str:
    return summary.get("name") or os.path.basename(os.path.normpath(path))


def plot_runs(paths: list[str], x: str = "round", y: str = "test_accuracy",
              output: str | None = None) -> str:
    """Overlay `y` against `x` ("round", "bytes" = up + down, "bytes_up", "wall") for several runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(p, *read_run(p)) for p in paths]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for path, summary, rows in runs:
        pts = [(_x(r, x), r.get(y)) for r in rows if r.get(y) is not None]
        if not pts:
            raise ConfigError(f"run has no values of {y!r}", file=path)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=_label(path, summary))
    ax.set_xlabel({"round": "round", "bytes": "bytes communicated (up + down)",
                   "bytes_up": "bytes sent up (clients to server / to neighbours)",
                   "wall": "wall-clock seconds"}[x])
    if x.startswith("bytes"):
        ax.set_xscale("log")
    ax.set_ylabel(y.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = output or "plot.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _x(row: dict[str, Any], x: str) -> float:
    if x == "bytes":
        return row.get("bytes_up", 0) + row.get("bytes_down", 0)
    if x == "bytes_up":
        return row.get("bytes_up", 0)
    return row.get("wall_s", 0.0) if x == "wall" else row["round"]


def compare_table(paths: list[str]) -> str:
    """Fixed-width table of the final metrics of several runs."""
    head = ("run", "strategy", "rounds", "train_loss", "test_loss", "test_acc", "best_acc", "MB_up",
            "MB_down", "wall_s")
    lines = []
    for p in paths:
        s, rows = read_run(p)
        last = rows[-1] if rows else {}
        vals = (_label(p, s), s.get("strategy", "?"), last.get("round"), last.get("train_loss"),
                last.get("test_loss"), last.get("test_accuracy"),
                max((r.get("test_accuracy", 0) for r in rows), default=None),
                last.get("bytes_up", 0) / 1e6, last.get("bytes_down", 0) / 1e6, s.get("wall_s"))
        lines.append([f"{v:.4f}" if isinstance(v, float) else str(v) for v in vals])
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in lines])
