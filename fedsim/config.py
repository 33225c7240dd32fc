"""Scenario files: YAML validated into typed, frozen objects with every default filled.

A scenario has the top-level keys ``name, seed, rounds, data, model, topology, participation,
strategy, work, system, attack, engine, eval, output, checkpoint`` and ``sweep`` (read by `fedsim
sweep`, see fedsim/sweep.py; a single run ignores it and never writes it into config.yaml).
Sections that pick a plug-in by ``kind``/``name``/``dataset`` take that plug-in's own keyword
arguments next to it; they are validated against the factory's signature, so unknown keys and bad
values are errors that name the file, the key path, the value and what is allowed.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

from fedsim.config_system import SystemCfg
from fedsim.errors import ConfigError
from fedsim.registry import plain, pydantic_to_config_error
from fedsim.yaml_safe import load_yaml_text

TOP_KEYS = ("name", "seed", "rounds", "data", "model", "topology", "participation", "strategy",
            "work", "system", "attack", "engine", "eval", "output", "checkpoint", "sweep")
_NAME = re.compile(r"[^/\\\x00]{1,200}")


MAX_YAML_BYTES = 8 * 2**20
"""Largest scenario file read (a scenario is a few kB; per-client lists of 10^5 values fit)."""
SEED_LIMIT = 2**63
"""Seeds are 0 <= seed < 2**63 (the keyed streams of fedsim.rng take 64-bit keys)."""

Int = Annotated[int, Strict()]
"""An int that is not a bool (`rounds: true` is an error, not 1 round)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _PluginSection(BaseModel):
    """A section whose extra keys are the selected plug-in's parameters (validated later)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PartitionCfg(_PluginSection):
    kind: str = "iid"


class DataCfg(_PluginSection):
    dataset: str = "digits"
    clients: Int = Field(10, gt=0)
    partition: PartitionCfg = PartitionCfg()


class ModelCfg(_PluginSection):
    kind: str = "mlp"
    init: Literal["shared", "independent"] = "shared"  # independent: one keyed init per client/node
    nonconvex_reg: float = Field(0.0, ge=0)  # lambda sum x^2/(1+x^2) added to every client's loss


class TopologyCfg(_PluginSection):
    kind: str = "star"
    mixing: Literal["metropolis", "max_degree"] = "metropolis"


class WorkCfg(_PluginSection):
    kind: str = "strategy"  # heterogeneous local work (fedsim.work): strategy | steps | uniform | epochs


class AttackCfg(_PluginSection):
    kind: str = "none"  # Byzantine clients (fedsim.attacks): none | sign_flip | scale | random


class ParticipationCfg(_PluginSection):
    kind: str = "full"


class StrategyCfg(_PluginSection):
    name: str = "fedavg"
    batch_size: Int | None = Field(32, gt=0)


class EngineCfg(_PluginSection):
    kind: str = "multiplex"
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float32"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", v):
            raise ValueError("device must be cpu, cuda, cuda:N or auto")
        return v


class EvalCfg(_Section):
    every: Int = Field(1, gt=0)
    batch_size: Int = Field(2048, gt=0)


class CheckpointCfg(_Section):
    every: Int | None = Field(None, ge=0)  # rounds between checkpoints; None: a tenth; 0: at the end


class OutputCfg(_Section):
    dir: str = "runs"
    trackers: tuple[Literal["tensorboard", "mlflow"], ...] = ()  # fedsim/trackers.py


class Scenario(_Section):
    name: str = "run"
    seed: Int = Field(0, ge=0, lt=SEED_LIMIT)
    rounds: Int = Field(10, gt=0)
    data: DataCfg = DataCfg()
    model: ModelCfg = ModelCfg()
    topology: TopologyCfg = TopologyCfg()
    participation: ParticipationCfg = ParticipationCfg()
    work: WorkCfg = WorkCfg()
    system: SystemCfg = SystemCfg()
    attack: AttackCfg = AttackCfg()
    strategy: StrategyCfg = StrategyCfg()
    engine: EngineCfg = EngineCfg()
    eval: EvalCfg = EvalCfg()
    output: OutputCfg = OutputCfg()
    checkpoint: CheckpointCfg = CheckpointCfg()
    sweep: dict[str, Any] | None = Field(None, exclude=True)  # checked by fedsim.sweep
    source: str | None = Field(None, exclude=True)

    @field_validator("name")
    @classmethod
    def _one_component(cls, v: str) -> str:
        """The run folder is ``<output.dir>/<name>-<stamp>``: a name is one path component."""
        if not _NAME.fullmatch(v) or v in (".", ".."):
            raise ValueError("name must be one path component (no '/' or '\\', not '.' or '..', "
                             "1 to 200 characters)")
        return v


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a raw scenario dict."""
    out = copy.deepcopy(raw)
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path or any(not p for p in path.split(".")):
            raise ConfigError("override must look like dotted.key=value", key="--set", value=item)
        try:
            value = load_yaml_text(text) if text else ""
        except yaml.YAMLError:
            value = text
        node = out
        parts = path.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError("cannot set a key inside a non-mapping value",
                                  key=".".join(parts[: i + 1]), value=nxt)
            node = nxt
        node[parts[-1]] = value
    return out


def read_yaml(path: str) -> dict[str, Any]:
    """Read a scenario mapping from `path` (ConfigError for missing/unreadable/bad YAML, a file
    over `MAX_YAML_BYTES`, duplicate keys, alias bombs)."""
    if not os.path.exists(path):
        raise ConfigError("scenario file not found", file=path)
    if os.path.isdir(path):
        raise ConfigError("scenario path is a directory, expected a YAML file", file=path)
    try:
        size = os.path.getsize(path)
        if size > MAX_YAML_BYTES:
            raise ConfigError("scenario file is too large", file=path, value=f"{size} bytes",
                              allowed=f"<= {MAX_YAML_BYTES} bytes (put data in data files)")
        with open(path, encoding="utf-8") as fh:
            raw = load_yaml_text(fh.read(), path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"invalid YAML{where}: {problem}", file=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read scenario: {exc}", file=path) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("a scenario must be a YAML mapping of top-level keys", file=path,
                          value=type(raw).__name__, allowed=", ".join(TOP_KEYS))
    return raw


def parse_scenario(raw: dict[str, Any], source: str | None = None) -> Scenario:
    """Validate a raw mapping (structure and every plug-in's parameters)."""
    try:
        try:
            sc = Scenario(**raw)
        except ValidationError as exc:
            err = pydantic_to_config_error(exc, list(TOP_KEYS))
            raise err from None
        except TypeError as exc:  # non-string keys
            raise ConfigError(f"bad scenario structure: {exc}") from None
        sc = resolve_plugins(sc)
        if sc.sweep is not None:
            from fedsim.sweep import check_section

            check_section(sc.sweep)
    except ConfigError as err:
        raise err.at(file=source) from None
    return sc.model_copy(update={"source": source})


def load_scenario(path: str, overrides: list[str] | None = None,
                  extra: dict[str, Any] | None = None, replace: tuple[str, ...] = ()) -> Scenario:
    """Read, override, validate and resolve a scenario file; `extra` is merged into it, its
    top-level sections named in `replace` replace the file's."""
    raw = read_yaml(path)
    try:
        raw = apply_overrides(raw, overrides or [])
    except ConfigError as err:
        raise err.at(file=path) from None
    if extra:
        raw = _merge({k: v for k, v in raw.items() if k not in replace}, extra)
    return parse_scenario(raw, source=path)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolved(section: _PluginSection, head: dict[str, Any], registry: Any, name: str,
              prefix: str) -> dict[str, Any]:
    try:
        params = registry.validate(name, section.params())
    except ConfigError as err:
        raise err.at(prefix=prefix) from None
    return {**head, **params}


def resolve_plugins(sc: Scenario) -> Scenario:
    """Validate every plug-in section against its factory and fill in the factory defaults."""
    from fedsim.attacks import ATTACKS
    from fedsim.data import DATASETS, PARTITIONS
    from fedsim.engines import ENGINES
    from fedsim.models import MODELS
    from fedsim.participation import PARTICIPATION
    from fedsim.work import WORK
    from strategies import STRATEGIES
    from topologies import TOPOLOGIES

    d = sc.data
    part = _resolved(d.partition, {"kind": d.partition.kind}, PARTITIONS, d.partition.kind,
                     "data.partition")
    data = _resolved(d, {"dataset": d.dataset, "clients": d.clients}, DATASETS, d.dataset, "data")
    data["partition"] = PartitionCfg(**part)
    model = ModelCfg(**_resolved(sc.model, {"kind": sc.model.kind, "init": sc.model.init,
                                            "nonconvex_reg": sc.model.nonconvex_reg},
                                 MODELS, sc.model.kind, "model"))
    topo = TopologyCfg(**_resolved(sc.topology, {"kind": sc.topology.kind, "mixing": sc.topology.mixing},
                                   TOPOLOGIES, sc.topology.kind, "topology"))
    part_cfg = ParticipationCfg(**_resolved(sc.participation, {"kind": sc.participation.kind},
                                            PARTICIPATION, sc.participation.kind, "participation"))
    strat = StrategyCfg(**_resolve_strategy(sc.strategy, STRATEGIES))
    work = WorkCfg(**_resolved(sc.work, {"kind": sc.work.kind}, WORK, sc.work.kind, "work"))
    attack = AttackCfg(**_resolved(sc.attack, {"kind": sc.attack.kind}, ATTACKS, sc.attack.kind, "attack"))
    eng = EngineCfg(**_resolved(sc.engine, {"kind": sc.engine.kind, "device": sc.engine.device,
                                            "dtype": sc.engine.dtype},
                                ENGINES, sc.engine.kind, "engine"))
    return sc.model_copy(update={"data": DataCfg(**data), "model": model, "topology": topo,
                                 "participation": part_cfg, "strategy": strat, "work": work, "attack": attack,
                                 "engine": eng})


def _resolve_strategy(cfg: StrategyCfg, registry: Any) -> dict[str, Any]:
    """Strategy params; a `compressor` the factory does not take itself compresses its uplink
    (`strategies.uplink.compress_uplink`), validated here as a nested compressor."""
    from fedsim.registry import build_nested

    head = {"name": cfg.name, "batch_size": cfg.batch_size}
    params = cfg.params()
    if cfg.name == "flower":  # a Flower strategy object on the server: fedsim.flower.plugin
        from fedsim.flower.plugin import validate_params
        try:
            return {**head, **validate_params(params)}
        except ConfigError as err:
            raise err.at(prefix="strategy") from None
    comp = None
    if "compressor" in params and "compressor" not in registry.params(cfg.name):
        try:
            comp = build_nested("compressors", params.pop("compressor"))
        except ConfigError as err:
            raise err.at(prefix="strategy.compressor") from None
    agg = _nested_aggregator(params, cfg.name, registry)
    try:
        out = {**head, **registry.validate(cfg.name, params)}
    except ConfigError as err:
        raise err.at(prefix="strategy") from None
    if comp is not None:
        out["compressor"] = comp
    if agg is not None:
        out["aggregator"] = agg
    return out


def _nested_aggregator(params: dict[str, Any], name: str, registry: Any) -> Any:
    """Pop and build `aggregator` (robust aggregation, `fedsim.robust`) when the strategy's
    factory does not take it itself; None without one."""
    from fedsim.registry import build_nested

    if "aggregator" not in params or "aggregator" in registry.params(name):
        return None
    try:
        return build_nested("aggregators", params.pop("aggregator"))
    except ConfigError as err:
        raise err.at(prefix="strategy.aggregator") from None


def to_dict(sc: Scenario) -> dict[str, Any]:
    """Plain, YAML-serialisable dict of the resolved scenario (the run folder's config.yaml)."""
    def section(v: Any) -> Any:
        if isinstance(v, BaseModel):
            d = {k: section(getattr(v, k)) for k in type(v).model_fields
                 if k not in ("source", "sweep")}
            d.update({k: plain(x) for k, x in (v.model_extra or {}).items()})
            return d
        return plain(v)
    out: dict[str, Any] = section(sc)
    return out
