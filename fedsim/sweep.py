"""`fedsim sweep`: the points of a sweep (scenario variants x seeds) and their validation.

A sweep is a base scenario plus axes. In YAML (the scenario's top-level ``sweep`` key) or on the
command line (flags replace the YAML's values of the same key):

  sweep:
    grid:                     # --grid strategy.lr=0.05,0.1 : dotted scenario key -> values
      strategy.lr: [0.05, 0.1]
    cases:                    # named axes of labelled override sets (YAML only)
      pattern:
        bernoulli: {}
        markov: {participation.kind: markov, participation.q: 0.05}
    seeds: 0-4                # --seeds 0-4 | 0,2,7 | [0, 1]; default: the scenario's seed
    jobs: 1                   # --jobs K: points at a time (processes; slurm: array parallelism)
    out: runs/my-sweep        # --out DIR: the sweep folder (default <output.dir>/<name>-sweep)
    launcher: local           # --launcher local|slurm
    ranks: 2                  # MPI ranks of a point whose engine.kind is mpi
    mpiexec: mpiexec -n {ranks}   # how the local launcher starts such a point
    submitit: {}              # --submitit K=V: submitit executor parameters (cluster, timeout_min, ...)

The points are the product of the case axes (in order), then the grid axes, then the seeds. A point
is a list of (dotted key, value) overrides applied to the base scenario like ``--set``; its id,
e.g. ``pattern=markov,lr=0.1,seed=0``, names its run folder inside the sweep folder, and its label
(the id without the seed) is the run's ``name`` and its group's label in `fedsim compare` and
`fedsim plot`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedsim.config import Scenario, apply_overrides, parse_scenario
from fedsim.errors import ConfigError
from fedsim.registry import pydantic_to_config_error
from fedsim.stats import short_key

RESERVED = ("seed", "name", "output", "sweep")
"""Top-level keys a sweep axis may not set (seeds have their own axis; the sweep names runs)."""


class SweepSpec(BaseModel):
    """The ``sweep`` section, validated (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grid: dict[str, list[Any]] = {}
    cases: dict[str, dict[str, dict[str, Any]]] = {}
    seeds: list[int] | str | int | None = None
    jobs: int = Field(1, ge=1)
    out: str | None = None
    launcher: Literal["local", "slurm"] = "local"
    ranks: int = Field(2, ge=1)
    mpiexec: str = "mpiexec -n {ranks}"
    submitit: dict[str, Any] = {}


@dataclass(frozen=True)
class Point:
    """One run of a sweep: `overrides` (dotted key, value) applied to the base scenario in order."""

    id: str
    label: str
    seed: int
    overrides: tuple[tuple[str, Any], ...]


def check_section(raw: Any, key: str = "sweep") -> SweepSpec:
    """Validate a ``sweep`` mapping: structure, axes and seeds (ConfigError under `key`)."""
    try:
        spec = SweepSpec(**raw) if isinstance(raw, dict) else SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise pydantic_to_config_error(exc, list(SweepSpec.model_fields)).at(prefix=key) from None
    except TypeError as exc:
        raise ConfigError(f"bad sweep structure: {exc}", key=key) from None
    for k, values in spec.grid.items():
        _check_key(k, f"{key}.grid")
        if not values:
            raise ConfigError("empty grid: the key has no values", key=f"{key}.grid.{k}", value=values)
    for axis, cases in spec.cases.items():
        if not cases:
            raise ConfigError("a case axis needs at least one case", key=f"{key}.cases.{axis}")
        for label, sets in cases.items():
            for k in sets:
                _check_key(k, f"{key}.cases.{axis}.{label}")
    parse_seeds(spec.seeds, f"{key}.seeds")
    return spec


def _check_key(k: str, where: str) -> None:
    if not k or any(not p for p in k.split(".")):
        raise ConfigError("an axis key must be a dotted scenario key", key=where, value=k,
                          allowed="e.g. strategy.lr")
    if k.split(".")[0] in RESERVED:
        raise ConfigError("this key is set by the sweep itself", key=where, value=k,
                          allowed="any scenario key except " + ", ".join(RESERVED)
                          + " (seeds: --seeds / sweep.seeds)")


def parse_seeds(seeds: list[int] | str | int | None, key: str = "--seeds") -> list[int] | None:
    """``"0-4"`` -> [0..4]; ``"0,2,7"``, ``"0-2,9"``, ``[0, 1]``, ``3``; None stays None."""
    if seeds is None:
        return None
    if isinstance(seeds, bool):
        raise ConfigError("seeds must be integers or ranges", key=key, value=seeds)
    if isinstance(seeds, int):
        seeds = [seeds]
    if isinstance(seeds, str):
        out: list[int] = []
        for part in (p.strip() for p in seeds.split(",")):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise ConfigError("seeds must look like 0-4 or 0,2,7 (non-negative integers)",
                                  key=key, value=seeds)
            lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
            if hi < lo:
                raise ConfigError(f"descending seed range {part}", key=key, value=seeds,
                                  allowed=f"{hi}-{lo}")
            out.extend(range(lo, hi + 1))
        seeds = out
    if not seeds:
        raise ConfigError("no seeds", key=key, value=seeds)
    if len(set(seeds)) != len(seeds):
        raise ConfigError("a seed is listed twice", key=key, value=seeds)
    return list(seeds)


def parse_grid_flags(items: list[str]) -> dict[str, list[Any]]:
    """``--grid key=v1,v2`` flags -> {key: [v1, v2]}; each value is parsed as YAML."""
    out: dict[str, list[Any]] = {}
    for it in items:
        k, sep, text = it.partition("=")
        if not sep or not k:
            raise ConfigError("a grid axis must look like dotted.key=v1,v2,...", key="--grid",
                              value=it)
        values = [_yaml_value(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise ConfigError("empty grid: the key has no values", key=f"--grid {k}", value=it)
        if k in out:
            raise ConfigError("the same grid key is given twice", key="--grid", value=k)
        _check_key(k, "--grid")
        out[k] = values
    return out


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def merge_flags(spec: SweepSpec, **flags: Any) -> SweepSpec:
    """CLI flags over the YAML section: grid keys replace the same key (others are added);
    every other flag given (not None) replaces the section's value."""
    update = {k: v for k, v in flags.items() if v is not None and k not in ("grid", "submitit")}
    if flags.get("submitit"):
        update["submitit"] = {**spec.submitit, **flags["submitit"]}
    grid = {**spec.grid, **(flags.get("grid") or {})}
    return check_section({**spec.model_dump(), **update, "grid": grid}, key="sweep")


def _fmt(v: Any) -> str:
    """A value as it appears in a point id: YAML-like scalars, `_` for separator characters."""
    if isinstance(v, bool) or v is None:
        text = {True: "true", False: "false", None: "null"}[v]
    elif isinstance(v, (int, float, str)):
        text = str(v)
    else:
        text = yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text) or "_"


def _short_names(spec: SweepSpec) -> dict[str, str]:
    """Grid key -> the name used in point ids: its last component unless that is ambiguous."""
    last = [short_key(k) for k in spec.grid]
    taken = set(spec.cases) | {"seed"}
    return {k: (s if last.count(s) == 1 and s not in taken else k)
            for k, s in zip(spec.grid, last, strict=True)}


def points(spec: SweepSpec, default_seed: int, base_name: str = "run") -> list[Point]:
    """Every point, seed-major (all settings of the first seed first), with unique ids; without
    axes the label is the base scenario's name."""
    short = _short_names(spec)
    axes: list[list[tuple[str, tuple[tuple[str, Any], ...]]]] = []
    for axis, cases in spec.cases.items():
        axes.append([(f"{axis}={_fmt(label)}", tuple(sets.items())) for label, sets in cases.items()])
    for k, values in spec.grid.items():
        axes.append([(f"{short[k]}={_fmt(v)}", ((k, v),)) for v in values])
    seeds = parse_seeds(spec.seeds, "sweep.seeds") or [default_seed]
    out: list[Any] = []
    seen: dict[str, Any] = {}
    for seed in seeds:
        for combo in itertools.product(*axes):
            label = ",".join(part for part, _ in combo)
            pid = ",".join(p for p in (label, f"seed={seed}") if p)
            overrides = tuple(kv for _, sets in combo for kv in sets) + (("seed", seed),)
            if pid in seen and seen[pid] != overrides:
                raise ConfigError("two points get the same name (values differ only in characters "
                                  "a folder name cannot hold)", key="sweep", value=pid)
            seen[pid] = overrides
            out.append(Point(pid, label or base_name, seed, overrides))
    return out


def point_raw(base: dict[str, Any], point: Point) -> dict[str, Any]:
    """The point's scenario mapping: the base with the point's overrides, named by its label (the
    same for every seed: the name of the experiment, as a plain run's)."""
    sets = [f"{k}={yaml.safe_dump(v, default_flow_style=True, width=10**6)}"
            for k, v in point.overrides]
    return apply_overrides(base, sets + [f"name={yaml.safe_dump(point.label)}"])


def validate_point(base: dict[str, Any], point: Point, source: str, build: bool = True,
                   cpu_only: bool = False) -> Scenario:
    """Resolve (and with `build`, build data, model and strategy of) one point, as
    `fedsim validate` does; a ConfigError names the point: ``FILE [point ID]: key: ...``."""
    where = f"{source} [point {point.id}]"
    try:
        sc = parse_scenario(point_raw(base, point), source=where)
        if build:
            from fedsim.setup import build_setup
            from fedsim.setup_checks import check_model_fits

            check_model_fits(build_setup(sc.model_copy(update={"engine": sc.engine.model_copy(
                update={"device": "cpu"})}) if cpu_only else sc))
    except ConfigError as err:
        raise err.at(file=where) from None
    return sc
