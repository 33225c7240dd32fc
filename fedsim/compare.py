"""`fedsim compare`: tables over runs and sweeps, grouped across seeds (Markdown or CSV).

Plain run folders that do not share a setting with another run keep the per-run table (one line
per run). Otherwise every group of runs that differ only in ``seed`` gets final and best metrics as
mean ± std with a 95 % t-interval, rounds (and simulated seconds, when runs record ``sim_time_s``)
to a target accuracy, and paired per-seed differences against a baseline group.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

from fedsim.errors import ConfigError
from fedsim.stats import (
    Estimate,
    Group,
    Run,
    best,
    distinguishing_labels,
    estimate,
    expand,
    final,
    group_runs,
    paired,
    per_seed,
    to_target,
)

Metric = tuple[str, Callable[[Run], "float | None"], int]
"""(column name, value of one run, decimals in Markdown)."""


def metrics(last: int, target: float | None, has_sim: bool) -> list[Metric]:
    fin = f"final{f' (mean of last {last})' if last > 1 else ''}"
    out: list[Metric] = [
        (f"{fin} test_accuracy", lambda r: final(r.rows, "test_accuracy", last), 4),
        ("best test_accuracy", lambda r: best(r.rows, "test_accuracy"), 4),
        (f"{fin} test_loss", lambda r: final(r.rows, "test_loss", last), 4),
        (f"{fin} train_loss", lambda r: final(r.rows, "train_loss", last), 4),
    ]
    if target is not None:
        out.append((f"rounds to test_accuracy >= {target:g}",
                    lambda r: to_target(r.rows, target), 1))
        if has_sim:
            out.append((f"sim seconds to test_accuracy >= {target:g}",
                        lambda r: to_target(r.rows, target, x="sim_time_s"), 2))
    return out


def _cell(e: Estimate, digits: int, n_runs: int, signed: bool = False) -> str:
    if e.mean is None:
        return f"not reached (0/{n_runs})" if n_runs else "–"
    f = (lambda v: f"{v:+.{digits}f}") if signed else (lambda v: f"{v:.{digits}f}")
    text = f(e.mean) if e.std is None else f"{f(e.mean)} ± {e.std:.{digits}f} [{f(e.low)}, {f(e.high)}]"
    return text if e.n == n_runs else f"{text} ({e.n}/{n_runs})"


def contexts(groups: list[Group]) -> list[tuple[str, list[Group]]]:
    """Groups whose configs are equal outside ``strategy.*``, labelled by what tells them apart."""
    out: dict[tuple, list[Group]] = {}
    for g in groups:
        ctx = tuple(sorted((k, repr(v)) for k, v in g.config.items() if not k.startswith("strategy.")))
        out.setdefault(ctx, []).append(g)
    cfgs = [{k: v for k, v in gs[0].config.items() if not k.startswith("strategy.")}
            for gs in out.values()]
    names = distinguishing_labels(cfgs) if len(cfgs) > 1 else ["all"]
    return list(zip(names, out.values(), strict=True))


def _baselines(gs: list[Group], name: str | None) -> list[Group]:
    """The baseline groups of a context: those labelled `name`, else those running strategy
    `name` (default: the first group's strategy)."""
    name = gs[0].config.get("strategy.name") if name is None else name
    by_label = [g for g in gs if g.label == name]
    return by_label or [g for g in gs if g.config.get("strategy.name") == name]


def pairs(groups: list[Group], baseline: str | None) -> list[tuple[str, Group, Group]]:
    """(context, group, its baseline) for every group that is not a baseline. Within a context
    (equal config outside ``strategy.*``) a group is paired with the baseline group that shares
    most of its strategy settings: fedau at lr 0.1 with fedavg at lr 0.1."""
    out, found = [], False
    for ctx, gs in contexts(groups):
        bases = _baselines(gs, baseline)
        found = found or bool(bases)
        for g in gs:
            if bases and g not in bases:
                same = [sum(g.config.get(k) == b.config.get(k) for k in g.config
                            if k.startswith("strategy.")) for b in bases]
                out.append((ctx, g, bases[same.index(max(same))]))
    if baseline is not None and not found:
        raise ConfigError("no group matches the baseline", key="--baseline", value=baseline,
                          allowed="a group label or a strategy name: "
                          + ", ".join(dict.fromkeys(g.label for g in groups)))
    return out


def legacy_table(runs: list[Run]) -> str:
    """One fixed-width line per run (the per-run table)."""
    head = ("run", "strategy", "rounds", "train_loss", "test_loss", "test_acc", "best_acc", "MB_up",
            "MB_down", "wall_s")
    lines = []
    for r in runs:
        s, rows = r.summary, r.rows
        last = rows[-1] if rows else {}
        vals = (r.name, s.get("strategy", "?"), last.get("round"), last.get("train_loss"),
                last.get("test_loss"), last.get("test_accuracy"),
                max((x.get("test_accuracy", 0) for x in rows), default=None),
                last.get("bytes_up", 0) / 1e6, last.get("bytes_down", 0) / 1e6, s.get("wall_s"))
        lines.append([f"{v:.4f}" if isinstance(v, float) else str(v) for v in vals])
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in lines])


def _md(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def markdown(groups: list[Group], ms: list[Metric], prs: list[tuple[str, Group, Group]]) -> str:
    rows = [[g.label, f"{len(g.runs)} ({', '.join(map(str, g.seeds))})",
             *(_cell(estimate(list(per_seed(g, fn).values())), d, len(g.runs)) for _, fn, d in ms)]
            for g in groups]
    out = ["Groups of runs that differ only in seed: mean ± std over seeds [95 % t-interval].", ""]
    out += _md(["group", "seeds", *(m[0] for m in ms)], rows)
    if prs:
        pm = [m for m in ms if m[0].startswith("final")][:2]
        out += ["", "Paired differences (group − baseline, per seed on the seeds both have): "
                "mean ± std [95 % t-interval].", ""]
        body = []
        for ctx, g, b in prs:
            ests = [paired(per_seed(g, fn), per_seed(b, fn)) for _, fn, _ in pm]
            common = len(set(g.seeds) & set(b.seeds))
            body.append([ctx, g.label, b.label, str(common),
                         *(_cell(e, d, common, signed=True) for e, (_, _, d) in zip(ests, pm, strict=True))])
        out += _md(["context", "group", "baseline", "pairs", *(f"Δ {m[0]}" for m in pm)], body)
    return "\n".join(out)


def csv_text(groups: list[Group], ms: list[Metric], prs: list[tuple[str, Group, Group]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "context", "group", "baseline", "metric", "n", "runs", "mean", "std",
                "ci_low", "ci_high"])
    ctx_of = {id(g): c for c, gs in contexts(groups) for g in gs}
    for g in groups:
        for name, fn, _ in ms:
            e = estimate(list(per_seed(g, fn).values()))
            w.writerow(["group", ctx_of[id(g)], g.label, "", name, e.n, len(g.runs), *_nums(e)])
    for ctx, g, b in prs:
        for name, fn, _ in ms:
            e = paired(per_seed(g, fn), per_seed(b, fn))
            w.writerow(["paired", ctx, g.label, b.label, name, e.n,
                        len(set(g.seeds) & set(b.seeds)), *_nums(e)])
    return buf.getvalue().rstrip("\n")


def _nums(e: Estimate) -> list[Any]:
    return ["" if v is None else repr(v) for v in (e.mean, e.std, e.low, e.high)]


def compare(paths: list[str], target: float | None = None, last: int = 1, fmt: str | None = None,
            baseline: str | None = None) -> str:
    """The `fedsim compare` text for run and sweep folders `paths`."""
    if last < 1:
        raise ConfigError("must be >= 1", key="--last", value=last)
    runs = expand(paths)
    groups = group_runs(runs)
    if fmt is None and target is None and baseline is None and all(len(g.runs) == 1 for g in groups):
        return legacy_table(runs)
    has_sim = any("sim_time_s" in row for r in runs for row in r.rows)
    ms = metrics(last, target, has_sim)
    prs = pairs(groups, baseline)
    return csv_text(groups, ms, prs) if fmt == "csv" else markdown(groups, ms, prs)
