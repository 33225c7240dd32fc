"""The scenario's ``system:`` section: device speeds, links, collectives and stragglers.

Every quantity that can differ between clients is a number (the same for all), a list of N
numbers, or a distribution drawn once per client, keyed by (seed, SYSTEM, quantity, client):
``{kind: lognormal, median: 1e10, sigma: 0.5}`` or ``{kind: uniform, low: 1e9, high: 1e10}``.
Units: seconds, bits per second, FLOP/s (or samples/s with ``speed_unit: samples``). The
defaults are the documented profile every run uses when the section is absent.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LognormalCfg(_Frozen):
    """exp(N(log median, sigma^2)) per client: heavy-tailed device speeds."""

    kind: Literal["lognormal"]
    median: float = Field(gt=0)
    sigma: float = Field(ge=0)


class UniformCfg(_Frozen):
    """Uniform on [low, high] per client."""

    kind: Literal["uniform"]
    low: float = Field(gt=0)
    high: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> UniformCfg:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self


Positive = PosFloat | list[PosFloat] | LognormalCfg | UniformCfg
"""A per-client positive quantity: one number, N numbers, or a keyed distribution."""
NonNegative = NonNegFloat | list[NonNegFloat] | LognormalCfg | UniformCfg
"""A per-client quantity >= 0 (latencies)."""


class LinkCfg(_Frozen):
    bandwidth: Positive = 1.0e7   # bits/s
    latency: NonNegative = 0.05   # seconds


class CollectiveCfg(_Frozen):
    bandwidth: float = Field(1.0e10, gt=0)  # bits/s per worker link (data-parallel cluster)
    latency: float = Field(1.0e-5, ge=0)    # seconds per message
    algorithm: Literal["ring", "tree"] = "ring"


class DeadlineCfg(_Frozen):
    seconds: float = Field(gt=0)
    policy: Literal["drop", "partial"] = "drop"  # drop late clients, or cap their local steps


class StalenessCfg(_Frozen):
    """Staleness weight s(tau) of an update tau server versions old (Xie et al. 2019, sec. 5.2):
    polynomial (1 + tau)^-a (a = 0.5: FedBuff's 1 / sqrt(1 + tau)); hinge 1 for tau <= b, else
    1 / (a (tau - b) + 1); constant 1."""

    kind: Literal["polynomial", "hinge", "constant"] = "polynomial"
    a: float = Field(0.5, ge=0)
    b: int = Field(0, ge=0)


class AsyncCfg(_Frozen):
    """Buffered asynchronous aggregation (FedBuff, Nguyen et al., AISTATS 2022; FedAsync, Xie et
    al. 2019, as buffer = 1): `concurrency` clients train at once, the server updates once
    `buffer` updates have arrived, each weighted by s(staleness)."""

    concurrency: int = Field(gt=0)
    buffer: int = Field(1, gt=0)
    staleness: StalenessCfg = StalenessCfg()

    @model_validator(mode="after")
    def _fits(self) -> AsyncCfg:
        if self.buffer > self.concurrency:
            raise ValueError(f"buffer ({self.buffer}) must be <= concurrency ({self.concurrency})")
        return self


class SystemCfg(_Frozen):
    speed: Positive = 1.0e10                      # FLOP/s per client (or samples/s, speed_unit)
    speed_unit: Literal["flops", "samples"] = "flops"
    jitter: float = Field(0.0, ge=0)              # lognormal sigma of a per-round speed factor
    uplink: LinkCfg = LinkCfg(bandwidth=1.0e7, latency=0.05)
    downlink: LinkCfg = LinkCfg(bandwidth=5.0e7, latency=0.05)
    edges: LinkCfg = LinkCfg(bandwidth=1.0e8, latency=0.005)  # gossip links (every edge)
    network: Literal["star", "allreduce"] = "star"  # allreduce: data-parallel workers (CO2)
    collective: CollectiveCfg = CollectiveCfg()
    server_time: float = Field(0.0, ge=0)         # seconds of the server's update
    deadline: DeadlineCfg | None = None
    dropout: float = Field(0.0, ge=0, lt=1)       # probability a selected client fails a round
    over_selection: float = Field(1.0, ge=1)      # keep the 1/f fastest of the selected clients
    asynchrony: AsyncCfg | None = None            # FedBuff / FedAsync instead of synchronous rounds

    @model_validator(mode="after")
    def _async_alone(self) -> SystemCfg:
        moved = None if self.asynchrony is None else first_set(self, ROUND_KEYS)
        if moved is not None:
            raise default_only(*moved, "a synchronous-round setting, which asynchronous aggregation "
                               "(system.asynchrony) does not use")
        return self


ROUND_KEYS = ("dropout", "over_selection", "deadline", "network")
"""`system:` keys of fedsim's synchronous server rounds: stragglers and the all-reduce network."""


def first_set(cfg: SystemCfg, keys: tuple[str, ...]) -> tuple[str, Any] | None:
    """(key, value) of the first of `keys` that `cfg` moves off its default (a section's value as
    a dict), or None. The one test behind "in this mode these keys stay at their defaults": with
    asynchrony (`SystemCfg`), gossip and Flower strategy objects (`fedsim.setup.refuse_server_system`)."""
    for key in keys:
        value = getattr(cfg, key)
        if value != type(cfg).model_fields[key].default:
            return key, value.model_dump() if isinstance(value, BaseModel) else value
    return None


def default_only(key: str, value: Any, why: str) -> ValidationError:
    """The validation error of `key` (under ``system``) holding `value` where only its default is
    allowed: the scenario's line names ``system.KEY``, the value, `why` and "allowed: the default"."""
    kind = PydanticCustomError("default_only", why, {"expected": "the default"})
    return ValidationError.from_exception_data("SystemCfg", [InitErrorDetails(type=kind, loc=(key,),
                                                                               input=value)])


__all__ = ["SystemCfg", "ROUND_KEYS", "first_set", "AsyncCfg", "StalenessCfg", "LinkCfg", "CollectiveCfg",
           "DeadlineCfg", "LognormalCfg", "UniformCfg", "Positive", "NonNegative"]
