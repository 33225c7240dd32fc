"""`fedsim plot`: curves of run and sweep folders, one per group of runs that differ only in seed.

A group of several seeds is drawn as its mean curve with a shaded band (± one standard deviation
over seeds, or the 95 % t-interval of the mean); a single run as its curve. Curves are aligned on
the evaluation rounds every run of the group has; on a bytes or seconds axis the x of a point is
the mean over seeds at that round (bytes differ between seeds when participation is random). A
round-0 evaluation, when runs record one, is the first point (a log axis cannot show x = 0).
"""

from __future__ import annotations

import functools
import math
from typing import Any

from fedsim.errors import ConfigError, check_output_file
from fedsim.stats import Group, estimate, expand, group_runs, read_run  # noqa: F401 (re-export)

X_AXES = {"round": "round", "bytes": "bytes communicated (up + down)",
          "bytes_up": "bytes sent up (clients to server / to neighbours)", "wall": "host seconds",
          "sim": "simulated seconds", "sim_time": "simulated seconds"}
LOG_Y = ("consensus_distance",)


def x_value(row: dict[str, Any], x: str) -> float | None:
    """The x of one metrics row: round, bytes (up + down), bytes_up, wall_s or sim_time_s."""
    if x == "bytes":
        return row.get("bytes_up", 0) + row.get("bytes_down", 0)
    key = {"round": "round", "bytes_up": "bytes_up", "wall": "wall_s", "sim": "sim_time_s",
           "sim_time": "sim_time_s"}[x]
    return row.get(key)


def mean_curve(group: Group, x: str, y: str, band: str = "std") -> tuple[list[float], ...]:
    """(xs, mean, low, high) of `y` over the group's runs at the rounds all of them evaluated.

    `band`: "std" (mean ± sample std), "ci" (95 % t-interval of the mean) or "none"; with one run
    low = high = the curve.
    """
    by_round = [{r["round"]: r for r in run.rows if r.get(y) is not None
                 and x_value(r, x) is not None} for run in group.runs]
    rounds = sorted(set.intersection(*(set(b) for b in by_round)))
    xs: list[float] = []
    mean: list[float] = []
    low: list[float] = []
    high: list[float] = []
    for t in rounds:
        e = estimate([b[t][y] for b in by_round])
        xs.append(math.fsum(float(x_value(b[t], x)) for b in by_round) / len(by_round))  # type: ignore[arg-type]
        m = e.mean
        assert m is not None  # every run of the group has a value at round t
        mean.append(m)
        if band == "std" and e.std is not None:
            lo, hi = m - e.std, m + e.std
        elif band == "ci" and e.low is not None and e.high is not None:
            lo, hi = e.low, e.high
        else:
            lo, hi = m, m
        low.append(lo)
        high.append(hi)
    return xs, mean, low, high


def _log_axis(axis: Any, unit: str, limits: tuple[float, float]) -> None:
    """Log scale whose tick labels never overlap: majors at 1, 2, 5 x 10^k on a short range, at
    powers of ten (thinned by matplotlib) on a long one, labelled plainly (engineering prefixes
    for bytes); minor ticks unlabelled."""
    from matplotlib import ticker

    lo, hi = sorted(limits)
    decades = math.log10(hi / lo) if lo > 0 else 99.0
    subs = (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)
    axis.set_major_locator(ticker.LogLocator(base=10, subs=subs, numticks=7))
    axis.set_minor_locator(ticker.LogLocator(base=10, subs="auto", numticks=12))
    axis.set_minor_formatter(ticker.NullFormatter())
    if unit:
        axis.set_major_formatter(ticker.EngFormatter(unit=unit, places=0))
    else:
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))


def _title(groups: list[Group], y: str) -> str:
    cfg = groups[0].config
    what = ", ".join(str(v) for v in (cfg.get("data.dataset"), cfg.get("data.clients") and
                                     f"{cfg['data.clients']} clients") if v)
    seeds = max(len(g.runs) for g in groups)
    tail = f"; mean over {seeds} seeds" if seeds > 1 else ""
    return f"{y.replace('_', ' ')}{f' — {what}' if what else ''}{tail}"


def figure(groups: list[Group], x: str = "round", y: str = "test_accuracy", band: str = "std",
           title: str | None = None, logy: bool | None = None) -> Any:
    """A matplotlib Figure with one curve (and band) per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    log_x, log_y = x.startswith("bytes"), (y in LOG_Y) if logy is None else logy
    for g in groups:
        xs, mean, low, high = mean_curve(g, x, y, band)
        keep = [i for i in range(len(xs)) if (not log_x or xs[i] > 0) and (not log_y or mean[i] > 0)]
        if "accuracy" in y:
            low, high = [max(v, 0.0) for v in low], [min(v, 1.0) for v in high]
        if log_y:  # a band reaching below 0 is cut at a tenth of the mean
            low = [lo if lo > 0 else m / 10 for lo, m in zip(low, mean, strict=True)]
        if not keep:
            raise ConfigError(f"no values of {y!r} against {x!r}", file=g.runs[0].path)
        pick = functools.partial(_pick, keep=keep)
        n = len(g.runs)
        (line,) = ax.plot(pick(xs), pick(mean), marker="." if len(keep) < 40 else None,
                          label=g.label + (f" (n={n})" if n > 1 else ""))
        if n > 1 and band != "none":
            ax.fill_between(pick(xs), pick(low), pick(high), color=line.get_color(), alpha=0.2,
                            linewidth=0)
    if log_x:
        ax.set_xscale("log")
        _log_axis(ax.xaxis, "B", ax.get_xlim())
    if log_y:
        ax.set_yscale("log")
        _log_axis(ax.yaxis, "", ax.get_ylim())
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel(y.replace("_", " "))
    ax.set_title(title or _title(groups, y), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_runs(paths: list[str], x: str = "round", y: str = "test_accuracy",
              output: str | None = None, band: str = "std", title: str | None = None,
              logy: bool | None = None) -> str:
    """Draw run and sweep folders `paths` into a PNG (default plot.png); returns its path."""
    check_output_file(output or "plot.png", "-o")
    fig = figure(group_runs(expand(paths)), x, y, band, title, logy)
    import matplotlib.pyplot as plt

    out = output or "plot.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _pick(values: list[Any], keep: list[int]) -> list[Any]:
    return [values[i] for i in keep]
