"""Runs across seeds: read run and sweep folders, group runs that differ only in ``seed``, and the
statistics `fedsim compare` and `fedsim plot` show.

Intervals are two-sided 95 % Student-t intervals over seeds, mean ± t_{0.975, n-1} s / sqrt(n)
(s the sample standard deviation, ddof = 1). Paired differences use the per-seed difference of two
groups on their common seeds: fedsim's streams are keyed by seed, so both groups saw the same data
split, participation draws and minibatches, and the shared noise cancels in the difference.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from fedsim.errors import ConfigError

IGNORED = ("seed", "name")
"""Config keys that do not make two runs different experiments (besides ``output.*``)."""


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {dotted key: leaf}; lists become tuples (hashable)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = tuple(_hashable(x) for x in v) if isinstance(v, list) else _hashable(v)
    return out


def _hashable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return v


def read_run(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, metrics rows) of a run folder; ConfigError if it is not one."""
    summ, met = os.path.join(path, "summary.json"), os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(met):
        raise ConfigError("not a run folder (no metrics.jsonl) nor a sweep folder (no sweep.json)",
                          file=path)
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


@dataclass
class Run:
    """One run folder: summary, metrics rows, flattened resolved config, sweep label if any."""

    path: str
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    config: dict[str, Any]
    sweep_label: str | None = None

    @property
    def seed(self) -> Any:
        return self.config.get("seed", self.summary.get("seed"))

    @property
    def name(self) -> str:
        return self.summary.get("name") or self.config.get("name") \
            or os.path.basename(os.path.normpath(self.path))


def load_run(path: str, sweep_label: str | None = None) -> Run:
    summary, rows = read_run(path)
    cfg_path = os.path.join(path, "config.yaml")
    config: dict[str, Any] = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as fh:
            config = flatten(yaml.safe_load(fh) or {})
    return Run(path, summary, rows, config, sweep_label)


def expand(paths: Iterable[str]) -> list[Run]:
    """Run folders as given; a sweep folder contributes its finished points in index order."""
    runs = []
    for p in paths:
        index = os.path.join(p, "sweep.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as fh:
                entries = json.load(fh).get("points", [])
            done = [e for e in entries
                    if e.get("status") == "ok" and os.path.isdir(os.path.join(p, e["id"]))]
            if len(done) < len(entries):
                print(f"note: {p}: {len(entries) - len(done)} of {len(entries)} points have not "
                      "finished and are left out", file=sys.stderr)
            runs += [load_run(os.path.join(p, e["id"]), e.get("label")) for e in done]
        else:
            runs.append(load_run(p))
    if not runs:
        raise ConfigError("no finished runs", file=", ".join(paths))
    return runs


def _key(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in IGNORED and not k.startswith("output.")}


@dataclass
class Group:
    """Runs whose resolved configs are equal apart from ``seed`` (and name, output), by seed."""

    config: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    label: str = ""

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups in order of first appearance, runs sorted by seed; a repeated seed keeps the first."""
    groups: dict[tuple, Group] = {}
    for r in runs:
        cfg = _key(r.config)
        g = groups.setdefault(tuple(sorted(cfg.items(), key=lambda kv: kv[0])), Group(cfg))
        if r.seed in g.seeds:
            print(f"note: {r.path} repeats seed {r.seed} of {g.runs[0].path}; ignored",
                  file=sys.stderr)
            continue
        g.runs.append(r)
    out = list(groups.values())
    for g in out:
        g.runs.sort(key=lambda r: (str(type(r.seed)), r.seed))
    for g, label in zip(out, labels(out), strict=True):
        g.label = label
    return out


def differing(configs: list[dict[str, Any]]) -> list[str]:
    """Keys whose value is not the same in every config (in first-seen order)."""
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]


def short_key(key: str) -> str:
    """``strategy.lr`` -> ``lr``; a plug-in chooser names its section: ``strategy.name`` ->
    ``strategy``, ``data.partition.kind`` -> ``partition``."""
    parts = key.split(".")
    return parts[-2] if len(parts) > 1 and parts[-1] in ("name", "kind", "dataset") else parts[-1]


def short_labels(configs: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """``k=v`` of `keys` per config (keys a config lacks are left out), k shortened by
    `short_key` unless that is ambiguous."""
    last = [short_key(k) for k in keys]
    names = [s if last.count(s) == 1 else k for k, s in zip(keys, last, strict=True)]
    return [",".join(f"{n}={c[k]}" for n, k in zip(names, keys, strict=True) if k in c) for c in configs]


def distinguishing_labels(configs: list[dict[str, Any]]) -> list[str]:
    """Labels from the keys that differ: first those every config has (a plug-in's own
    parameters follow its chooser), then, if still ambiguous, the others too."""
    keys = differing(configs)
    common = [k for k in keys if all(k in c for c in configs)]
    out = short_labels(configs, common)
    if len(set(out)) == len(out):
        return out
    return short_labels(configs, common + [k for k in keys if k not in common])


def drop_common(names: list[str]) -> list[str]:
    """Sweep-style labels ``a=1,b=2`` without the parts every label has (``pattern=markov`` when
    all groups are Markov runs), if they stay distinct and non-empty."""
    parts = [n.split(",") for n in names]
    common = set.intersection(*(set(p) for p in parts)) if parts else set()
    out = [",".join(x for x in p if x not in common) for p in parts]
    ok = len(names) > 1 and all(out) and len(set(out)) == len(out)
    return out if ok else names


def labels(groups: list[Group]) -> list[str]:
    """Sweep labels, else run names, when they tell the groups apart; else the differing keys."""
    for pick in (lambda r: r.sweep_label, lambda r: r.name):
        cand = [{pick(r) for r in g.runs} for g in groups]
        if all(len(c) == 1 and None not in c for c in cand) and \
                len({next(iter(c)) for c in cand}) == len(groups):
            return drop_common([next(iter(c)) for c in cand])
    if len(groups) == 1:
        return [groups[0].runs[0].name]
    return distinguishing_labels([g.config for g in groups])


@dataclass(frozen=True)
class Estimate:
    """Mean, sample std and 95 % t-interval of `n` values (std and interval None when n < 2)."""

    n: int
    mean: float | None
    std: float | None
    low: float | None
    high: float | None


def estimate(values: list[float], level: float = 0.95) -> Estimate:
    from scipy import stats

    n = len(values)
    if n == 0:
        return Estimate(0, None, None, None, None)
    mean = math.fsum(values) / n
    if n < 2:
        return Estimate(1, mean, None, None, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return Estimate(n, mean, std, mean - half, mean + half)


def final(rows: list[dict[str, Any]], key: str, last: int = 1) -> float | None:
    """Mean of `key` over the last `last` evaluations that have it."""
    vals = [r[key] for r in rows if r.get(key) is not None][-last:]
    return math.fsum(vals) / len(vals) if vals else None


def best(rows: list[dict[str, Any]], key: str) -> float | None:
    """Highest accuracy / lowest loss or distance over the evaluations."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return None
    return max(vals) if "accuracy" in key else min(vals)


def to_target(rows: list[dict[str, Any]], target: float, key: str = "test_accuracy",
              x: str = "round") -> float | None:
    """`x` at the first evaluation whose `key` reaches `target` (None: never reached)."""
    for r in rows:
        if r.get(key) is not None and r[key] >= target and r.get(x) is not None:
            return r[x]
    return None


def per_seed(group: Group, value: Callable[[Run], float | None]) -> dict[Any, float]:
    """{seed: value(run)} for the group's runs with a value."""
    return {r.seed: v for r in group.runs if (v := value(r)) is not None}


def paired(a: dict[Any, float], b: dict[Any, float]) -> Estimate:
    """Estimate of the per-seed difference a - b over the seeds both have."""
    common = [s for s in a if s in b]
    return estimate([a[s] - b[s] for s in common])
