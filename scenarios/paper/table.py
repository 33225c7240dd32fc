"""Reproduction tables: a metric at given rounds, rounds to given values, final values, as
mean ± std over seeds (the README's tables that `fedsim compare` does not print).

Runs are grouped as `fedsim compare` groups them (equal resolved configs apart from the seed);
a group is named by its run name. `--metric node_accuracy_mean --fallback test_accuracy` reads
the mean accuracy of the node models of gossip runs and the server model's accuracy for FL runs
(where every client holds the server model after the broadcast).

`--plot FILE` draws the same metric against the round, the mean over seeds with a ± std band.

Usage:
  python scenarios/paper/table.py runs/gossip/* --metric node_accuracy_mean \\
      --fallback test_accuracy --at 50 100 200 --reach 0.8 0.9 --plot docs/figures/gossip.png
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from fedsim.stats import Group, Run, estimate, expand, group_runs


def value(run: Run, key: str, fallback: str | None) -> str:
    """The key a run records: `key`, else `fallback`."""
    has = any(r.get(key) is not None for r in run.rows)
    return key if has or fallback is None else fallback


def at_round(run: Run, key: str, rnd: int) -> float | None:
    return next((r[key] for r in run.rows if r.get("round") == rnd and r.get(key) is not None), None)


def reach(run: Run, key: str, target: float) -> float | None:
    return next((r["round"] for r in run.rows if r.get(key) is not None and r[key] >= target), None)


def final(run: Run, key: str, last: int) -> float | None:
    vals = [r[key] for r in run.rows if r.get(key) is not None][-last:]
    return math.fsum(vals) / len(vals) if vals else None


def cell(values: list[float | None], digits: int, n: int) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "never"
    e = estimate(got)
    text = f"{e.mean:.{digits}f}" + (f" ± {e.std:.{digits}f}" if e.std is not None else "")
    return text + (f" ({len(got)}/{n} seeds)" if len(got) < n else "")


def names(groups: list[Group]) -> list[str]:
    """Each group's run name, or its distinguishing label where two groups share a name."""
    first = [g.runs[0].name for g in groups]
    return [n if first.count(n) == 1 else g.label for n, g in zip(first, groups, strict=True)]


def row(g: Group, name: str, args: argparse.Namespace) -> list[str]:
    n = len(g.runs)
    keys = [value(r, args.metric, args.fallback) for r in g.runs]
    out = [name, f"{n} ({', '.join(str(s) for s in g.seeds)})"]
    out += [cell([at_round(r, k, t) for r, k in zip(g.runs, keys, strict=True)], 3, n) for t in args.at]
    out += [cell([reach(r, k, t) for r, k in zip(g.runs, keys, strict=True)], 0, n) for t in args.reach]
    for key in args.final:
        out.append(cell([final(r, value(r, key, args.fallback if key == args.metric else None), args.last)
                         for r in g.runs], 3, n))
    return out


def plot(groups: list[Group], args: argparse.Namespace) -> None:
    """The metric against the round: mean over seeds and a ± std band per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for g, name in zip(groups, names(groups), strict=True):
        curves = [{r["round"]: r[k] for r in run.rows if r.get(k) is not None}
                  for run, k in ((run, value(run, args.metric, args.fallback)) for run in g.runs)]
        rounds = sorted(set.intersection(*(set(c) for c in curves)))
        stats = [estimate([c[t] for c in curves]) for t in rounds]
        mean = [e.mean for e in stats]
        ax.plot(rounds, mean, label=f"{name} (n={len(g.runs)})")
        if len(g.runs) > 1:
            low, high = [e.mean - e.std for e in stats], [e.mean + e.std for e in stats]
            ax.fill_between(rounds, low, high, alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel(args.metric + (f" ({args.fallback} where absent)" if args.fallback else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run or sweep folders")
    ap.add_argument("--metric", default="test_accuracy")
    ap.add_argument("--fallback", default=None, help="key to read where a run lacks --metric")
    ap.add_argument("--at", type=int, nargs="*", default=[], help="rounds to read --metric at")
    ap.add_argument("--reach", type=float, nargs="*", default=[], help="values of --metric to reach")
    ap.add_argument("--final", nargs="*", default=[], help="keys to report at the end")
    ap.add_argument("--last", type=int, default=1, help="final = mean of the last K evaluations")
    ap.add_argument("--plot", default=None, help="also draw the metric against the round (PNG)")
    args = ap.parse_args(argv)
    header = ["run", "seeds", *(f"{args.metric} @{t}" for t in args.at),
              *(f"rounds to {t:g}" for t in args.reach), *(f"final {k}" for k in args.final)]
    lines: list[Any] = [header, ["---"] * len(header)]
    groups = group_runs(expand(args.runs))
    lines += [row(g, name, args) for g, name in zip(groups, names(groups), strict=True)]
    print("\n".join("| " + " | ".join(map(str, ln)) + " |" for ln in lines))
    if args.plot:
        plot(groups, args)


if __name__ == "__main__":
    main()
