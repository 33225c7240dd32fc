"""`strategy: {name: flower, class: ...}`: a Flower strategy object drives fedsim's clients.

    strategy:
      name: flower
      class: flwr.serverapp.strategy.FedAdam   # any flwr.serverapp.strategy.Strategy subclass
      lr: 0.05                                 # fedsim's local SGD on every client
      local_steps: 10
      eta: 0.01                                # the class's own keyword arguments
    engine: {kind: flower}

`flower` is not an entry of the engine-agnostic strategy registry (`strategies.STRATEGIES`):
its server half is a Flower object that only the Flower engine runs. The scenario loader
(`fedsim.config`) hands its keys to `validate_params` and `fedsim.setup` builds the client half
with `client_strategy`, which also enforces the cross-section rules (engine `flower`, `star`
topology, `full` participation: the Flower strategy samples the nodes itself). A Flower
strategy receives full models, so no `compressor` key. `class` keys whose parameter is itself a
Flower strategy (the differential-privacy wrappers' `strategy`) take a nested
`{class: ..., <kwargs>}` mapping.

The client half is fedsim's local SGD (`strategies.local.local_sgd`, the same steps as
`fedavg`'s clients) from the model the message carries; it sends the model back. A
`proximal-mu` in the message's config (Flower's `FedProx`) adds mu (y - x) to each gradient.
This module imports flwr only inside the functions that need it.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from typing import Any

import torch

from fedsim.constraints import PositiveFloat, PositiveInt
from fedsim.errors import ConfigError
from fedsim.types import Oracle, RoundCtx, Strategy, Tree, no_clients

NAME = "flower"
BASE = "flwr.serverapp.strategy.Strategy"
OWN = ("lr", "local_steps")


def local_sgd_keys(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10) -> None:
    """fedsim's local SGD on every client: `local_steps` minibatch steps of size `lr`."""


def _import(path: Any, key: str) -> type:
    from flwr.serverapp.strategy import Strategy as FlowerStrategy

    allowed = f"a dotted path of a {BASE} subclass, e.g. flwr.serverapp.strategy.FedAvg"
    if not isinstance(path, str) or not path.strip(".:"):
        raise ConfigError("a Flower strategy needs its class", key=key, value=path, allowed=allowed)
    mod, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        obj: Any = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"cannot import the Flower strategy class: {exc}", key=key, value=path,
                          allowed=allowed) from None
    if not (inspect.isclass(obj) and issubclass(obj, FlowerStrategy)) or inspect.isabstract(obj):
        raise ConfigError("not a (concrete) Flower strategy class", key=key, value=path,
                          allowed=allowed)
    return obj


def _init_params(cls: type) -> dict[str, tuple[inspect.Parameter, Any]]:
    """Keyword parameters of `cls.__init__` with their annotations; a `**kwargs` that a
    subclass passes on to its base adds the base class's parameters (user subclasses)."""
    out: dict[str, tuple[inspect.Parameter, Any]] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        init = vars(klass)["__init__"]
        try:
            hints = typing.get_type_hints(init, include_extras=True)
        except Exception:  # noqa: BLE001 - unresolvable annotations of a user class: check only the keys
            hints = {}
        params = inspect.signature(init).parameters
        for k, p in params.items():
            if k != "self" and k not in out and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                out[k] = (p, hints.get(k, Any))
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return out


def _strategy_params(cls: type) -> set[str]:
    """Constructor parameters of `cls` annotated with a Flower strategy type (nested)."""
    from flwr.serverapp.strategy import Strategy as FlowerStrategy

    def is_strategy(ann: Any) -> bool:
        return any(inspect.isclass(a) and issubclass(a, FlowerStrategy)
                   for a in (typing.get_args(ann) or (ann,)))
    return {k for k, (_, ann) in _init_params(cls).items() if is_strategy(ann)}


_VALIDATORS: dict[type, Any] = {}


def _validator(cls: type, nested: set[str]) -> Any:
    """A stand-in function with the keyword parameters of `cls` (but `nested`), for
    `fedsim.registry.validate_kwargs`; annotations pydantic cannot check become `Any`."""
    if cls in _VALIDATORS:
        return _VALIDATORS[cls]
    from pydantic import ConfigDict, TypeAdapter

    def checkable(ann: Any) -> Any:
        try:
            TypeAdapter(ann, config=ConfigDict(arbitrary_types_allowed=True))
            return ann
        except Exception:  # noqa: BLE001 - protocols, forward references: accept any value
            return Any

    params = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=p.default,
                                annotation=checkable(ann))
              for k, (p, ann) in _init_params(cls).items() if k not in nested]

    def keys(**kwargs: Any) -> None:
        """The keyword arguments of a Flower strategy class."""
    keys.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    keys.__annotations__ = {p.name: p.annotation for p in params}
    keys.__name__ = cls.__name__
    _VALIDATORS[cls] = keys
    return keys


def validate_class(spec: Any, prefix: str = "") -> dict[str, Any]:
    """`{class: ..., <kwargs>}` -> the same with every default filled (nested specs too).

    ConfigError (keys relative to `prefix`) on a missing/unimportable class, a class that is
    not a Flower strategy, unknown or ill-typed keyword arguments.
    """
    from fedsim.registry import validate_kwargs

    where = f"{prefix}." if prefix else ""
    if not isinstance(spec, dict):
        raise ConfigError("a Flower strategy is a mapping {class: ..., <kwargs>}",
                          key=prefix or None, value=spec)
    kwargs = {k: v for k, v in spec.items() if k != "class"}
    cls = _import(spec.get("class"), f"{where}class")
    nested = _strategy_params(cls)
    try:
        out = validate_kwargs(_validator(cls, nested),
                              {k: v for k, v in kwargs.items() if k not in nested})
    except ConfigError as err:
        raise err.at(prefix=prefix or None) from None
    params = _init_params(cls)
    for k in sorted(nested):
        if k in kwargs:
            out[k] = validate_class(kwargs[k], f"{where}{k}")
        elif params[k][0].default is inspect.Parameter.empty:
            raise ConfigError("required key is missing", key=f"{where}{k}",
                              allowed="a nested Flower strategy {class: ..., <kwargs>}")
        else:
            out[k] = params[k][0].default
    return {"class": spec["class"], **out}


def validate_params(params: dict[str, Any]) -> dict[str, Any]:
    """The `strategy` keys of `name: flower` (lr, local_steps, class and its kwargs), resolved."""
    from fedsim.registry import validate_kwargs

    if "compressor" in params:
        raise ConfigError("a Flower strategy receives full models: no uplink compressor",
                          key="compressor", allowed="no compressor key")
    mine = validate_kwargs(local_sgd_keys, {k: v for k, v in params.items() if k in OWN})
    try:
        theirs = validate_class({k: v for k, v in params.items() if k not in OWN})
    except ConfigError as err:
        if err.msg != "unknown key" or "." in (err.key or "."):
            raise
        raise ConfigError(err.msg, key=err.key, allowed=f"class, {', '.join(OWN)}, "
                          f"and the class's own: {err.allowed}") from None
    return {**mine, **theirs}


def build_flower_strategy(spec: dict[str, Any]) -> Any:
    """The Flower strategy object of a validated `{class: ..., <kwargs>}` mapping."""
    cls = _import(spec["class"], "class")
    nested = _strategy_params(cls)
    kwargs = {k: build_flower_strategy(v) if k in nested and isinstance(v, dict) else v
              for k, v in spec.items() if k != "class"}
    return cls(**kwargs)


def class_spec(params: dict[str, Any]) -> dict[str, Any]:
    """The `{class: ..., <kwargs>}` part of validated `strategy` params."""
    return {k: v for k, v in params.items() if k not in OWN}


def check_scenario(sc: Any) -> None:
    """The rules a Flower strategy puts on the rest of the scenario (ConfigError if broken)."""
    rules = (("engine.kind", sc.engine.kind, "flower",
              "a Flower strategy runs on the Flower engine"),
             ("topology.kind", sc.topology.kind, "star",
              "a Flower strategy is a server strategy: no gossip topology"),
             ("participation.kind", sc.participation.kind, "full",
              "the Flower strategy samples the nodes itself (e.g. fraction_train)"))
    for key, value, allowed, why in rules:
        if value != allowed:
            raise ConfigError(why, key=key, value=value, allowed=allowed)


def client_strategy(sc: Any) -> Strategy:
    """The client half (fedsim `Strategy`) of scenario `sc` with `strategy.name: flower`.

    Shapes: server {"x": [P] or [m, P], optional "proximal_mu": []}; payload {"x": [m, P]}
    (the locally trained models); no client state; `server_update` is Flower's.
    """
    from strategies.local import broadcast_rows, local_sgd

    check_scenario(sc)
    p = sc.strategy.params()
    lr, steps = float(p["lr"]), int(p["local_steps"])

    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        x = broadcast_rows(server["x"], ctx.m)
        mu = float(server["proximal_mu"]) if "proximal_mu" in server else 0.0
        if mu == 0.0:
            y, loss = local_sgd(x, oracle, steps, lr)
        else:
            y, loss = _proximal_sgd(x, oracle, steps, lr, mu)
        return {"x": y}, clients, {"loss": loss}

    return Strategy(init_server=lambda x0: {"x": x0.clone()}, init_clients=no_clients,
                    local=local, payload=lambda n: {"x": (n,)})


def _proximal_sgd(x: torch.Tensor, oracle: Oracle, steps: int, lr: float, mu: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """FedProx's local solver: SGD on f_i(y) + mu/2 |y - x|^2 (Li et al., MLSys 2020)."""
    y = x
    loss_sum = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for k in range(steps):
        loss, g = oracle(y, k)
        loss_sum += loss.double()
        y = torch.add(y, g + mu * (y - x), alpha=-lr)
    return y, loss_sum / max(steps, 1)
