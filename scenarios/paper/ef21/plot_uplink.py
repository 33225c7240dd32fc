"""Suboptimality f(x) - f* against the bytes the workers sent up (the EF21 paper's x-axis).

`fedsim plot --x bytes` adds the downlink (the dense model broadcast each round), which hides
what compression saves on the uplink; this plots bytes_up only, on log-log axes, one curve per
run group (its first seed). f* of a seed is the smallest train loss over all given runs of that
seed (the GD run gets there first). `--table` prints, per group, the uplink bytes to reach
f - f* <= 1e-3 and 1e-6 and the final f - f*, as mean ± std over the seeds.

Usage: python scenarios/paper/ef21/plot_uplink.py RUN_OR_SWEEP_DIR... -o docs/figures/ef21.png [--table]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedsim.stats import Run, estimate, expand, group_runs  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from table import names  # noqa: E402  (scenarios/paper/table.py)

THRESHOLDS = (1e-3, 1e-6)


def gaps(run: Run, f_star: float) -> list[tuple[float, float]]:
    """(bytes_up, train loss - f*) at every evaluation with a train loss."""
    return [(r["bytes_up"], r["train_loss"] - f_star) for r in run.rows if r.get("train_loss") is not None]


def bytes_to(points: list[tuple[float, float]], eps: float) -> float | None:
    return next((b for b, g in points if g <= eps), None)


def fmt(values: list[float | None], spec: str) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "never"
    e = estimate(got)
    text = format(e.mean, spec) + (" ± " + format(e.std, spec) if e.std is not None else "")
    return text if len(got) == len(values) else f"{text} ({len(got)}/{len(values)} seeds)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("-o", "--output", default="ef21.png")
    ap.add_argument("--table", action="store_true", help="also print the bytes-to-threshold table")
    args = ap.parse_args()
    runs = expand(args.runs)
    f_star = {}
    for r in runs:
        losses = [row["train_loss"] for row in r.rows if row.get("train_loss") is not None]
        f_star[r.seed] = min(f_star.get(r.seed, math.inf), *losses)
    groups = group_runs(runs)
    labels = names(groups)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for g, name in zip(groups, labels, strict=True):
        pts = gaps(g.runs[0], f_star[g.runs[0].seed])
        ax.plot([b for b, _ in pts], [max(v, 1e-7) for _, v in pts], marker=".", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes sent up by all workers")
    ax.set_ylabel("train loss - f*  (floored at 1e-7, float32)")
    ax.set_title(f"seed {groups[0].runs[0].seed}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(args.output)
    if args.table:
        print("| run | seeds | " + " | ".join(f"uplink bytes to f-f* <= {t:g}" for t in THRESHOLDS)
              + " | final f - f* |")
        print("|---" * (3 + len(THRESHOLDS)) + "|")
        for g, name in zip(groups, labels, strict=True):
            per = [gaps(r, f_star[r.seed]) for r in g.runs]
            cells = [fmt([bytes_to(p, t) for p in per], ",.0f") for t in THRESHOLDS]
            last = fmt([p[-1][1] for p in per], ".1e")
            print(f"| {name} | {len(g.runs)} | " + " | ".join(cells) + f" | {last} |")


if __name__ == "__main__":
    main()
