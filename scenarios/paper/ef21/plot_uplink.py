"""Suboptimality f(x) - f* against the bytes the workers sent up (the EF21 paper's x-axis).

`fedsim plot --x bytes` adds the downlink (the dense model broadcast each round), which hides
what compression saves on the uplink; this plots bytes_up only, on log-log axes.
f* is the smallest train loss over all given runs (the GD run gets there first).

Usage: python scenarios/paper/ef21/plot_uplink.py RUN_DIR... -o docs/figures/ef21.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedsim.plot import read_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("-o", "--output", default="ef21.png")
    args = ap.parse_args()
    runs = [read_run(p) for p in args.runs]
    f_star = min(r["train_loss"] for _, rows in runs for r in rows if r.get("train_loss") is not None)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for summary, rows in runs:
        pts = [(r["bytes_up"], r["train_loss"] - f_star) for r in rows if r.get("train_loss") is not None]
        ax.plot([b for b, _ in pts], [max(g, 1e-7) for _, g in pts], marker=".", label=summary.get("name"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes sent up by all workers")
    ax.set_ylabel("train loss - f*  (floored at 1e-7, float32)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(args.output)


if __name__ == "__main__":
    main()
