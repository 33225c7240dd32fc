"""Compressors: stateless row-wise transforms of [m, d] client messages, and the uplink wrapper.

A `Compressor` is a NamedTuple of pure functions. `compress(v [m, d], ctx) -> (decoded [m, d],
bits [m])` returns what the receiver decodes and the bits a real encoding of each row sends.
Values travel as float32 (FLOAT_BITS = 32, the engine's default dtype), indices with
ceil(log2 d) bits. Randomness (rand_k masks, stochastic rounding) is keyed by (seed, COMPRESS,
*stream, round, client id, coordinate) through `fedsim.rng`, so a row compresses the same way
whatever chunk, rank or process it is in. Contraction parameters (E||C(v) - v||^2 <= (1 - alpha)
||v||^2) are functions of d: `alpha(d)` is that of the *contractive form* of the compressor
(the compressor itself when biased, C / (1 + omega) when unbiased with variance omega).

State lives elsewhere: error feedback (EF14, EF21) keeps per-client rows in the strategy's
client tree (`compress_uplink`, defined in `strategies/_uplink.py` and re-exported here, and
`strategies/ef21.py`), so compressors compose freely with `chain`. Scenario form:
``{name: top_k, ratio: 0.01}``, ``{name: chain, stages: [{name: top_k, k: 10}, {name: qsgd}]}``.

References: Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018, arXiv:1809.07599
(top_k, rand_k); Alistarh et al., "QSGD", NeurIPS 2017, arXiv:1610.02132; Horváth et al.,
"Natural Compression for Distributed Deep Learning", arXiv:1905.10988; Seide et al. 2014 and
Karimireddy et al., ICML 2019, arXiv:1901.09847 (classic error feedback).
"""

from __future__ import annotations

import inspect
import math
from typing import Annotated, Any, Callable, Mapping, NamedTuple

import torch
from pydantic import AfterValidator, Field

from fedsim import rng
from fedsim.errors import ConfigError
from fedsim.registry import Registry
from fedsim.types import RoundCtx

COMPRESSORS = Registry("compressors", builtins=("strategies.compress",),
                       reserved=("seed", "stream", "contractive"))
FLOAT_BITS = 32
Ratio = Annotated[float, Field(gt=0, le=1)]
PosInt = Annotated[int, Field(gt=0)]


class Compressor(NamedTuple):
    """Row-wise compression operator C: [m, d] -> [m, d] (decoded), plus its constants.

    Attributes:
      compress: (v [m, d], ctx) -> (decoded [m, d], bits [m] float64).
      alpha: d -> contraction parameter of the contractive form (1 for identity, k/d for top_k).
      omega: d -> variance parameter when unbiased (E C(v) = v, E||C(v) - v||^2 <= omega ||v||^2),
        None when biased.
      select: sparsifiers only: (v, ctx) -> (indices [m, k] ascending, values [m, k] as decoded,
        index bits [m]); `chain` runs later stages on the k kept values only.
      kept: d -> number of values the decoded row can hold (k for sparsifiers).
    """

    compress: Callable[[torch.Tensor, RoundCtx], tuple[torch.Tensor, torch.Tensor]]
    alpha: Callable[[int], float]
    omega: Callable[[int], float] | None = None
    select: Callable[[torch.Tensor, RoundCtx], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    kept: Callable[[int], int] = lambda d: d


def _bits(v: torch.Tensor, per_row: float) -> torch.Tensor:
    return torch.full((v.shape[0],), float(per_row), dtype=torch.float64, device=v.device)


def _index_bits(d: int) -> int:
    return math.ceil(math.log2(d)) if d > 1 else 0


def _uniform(seed: int | None, stream: tuple[int, ...], ctx: RoundCtx, d: int) -> torch.Tensor:
    """[m, d] float64 uniforms keyed by (seed, COMPRESS, *stream, round, client id, coordinate)."""
    ids = ctx.ids
    pos = torch.arange(d, device=ids.device)
    return rng.uniform_torch(ctx.seed if seed is None else seed, rng.COMPRESS, *stream, ctx.round,
                             ids[:, None], pos[None, :], device=ids.device)


def _num_kept(ratio: float | None, k: int | None, d: int) -> int:
    if k is not None:
        return min(k, d)
    return max(1, min(d, math.ceil(ratio * d - 1e-9)))  # tolerance: 0.1 * 30 is 3.0000000000000004


def _sparsifier(select: Callable, alpha: Callable[[int], float], omega: Callable | None,
                kept: Callable[[int], int]) -> Compressor:
    """A Compressor from its `select` (scatter the kept values; bits = indices + 32 per value)."""
    def compress(v: torch.Tensor, ctx: RoundCtx) -> tuple[torch.Tensor, torch.Tensor]:
        idx, vals, ibits = select(v, ctx)
        return torch.zeros_like(v).scatter(1, idx, vals), ibits + FLOAT_BITS * idx.shape[1]
    return Compressor(compress, alpha, omega, select, kept)


def _check_k(ratio: float | None, k: int | None) -> None:
    if (ratio is None) == (k is None):
        raise ConfigError("give exactly one of ratio (fraction of coordinates) or k (count)",
                          key="ratio" if ratio is None else "k", value=ratio if k is None else k)


@COMPRESSORS.register("identity")
def identity(*, seed: int | None = None, stream: tuple[int, ...] = ()) -> Compressor:
    """No compression: the dense row, 32 bits per value (alpha = 1, omega = 0)."""
    return Compressor(lambda v, ctx: (v.clone(), _bits(v, FLOAT_BITS * v.shape[1])),
                      alpha=lambda d: 1.0, omega=lambda d: 0.0)


@COMPRESSORS.register("top_k")
def top_k(*, ratio: Ratio | None = None, k: PosInt | None = None, seed: int | None = None,
          stream: tuple[int, ...] = ()) -> Compressor:
    """Top-k: keep the k largest |v_j| of each row (biased, deterministic, alpha = k/d).

    Args:
      ratio: k = ceil(ratio * d) (at least 1); or k: a fixed count (capped at d).

    Ties at the k-th magnitude go to the lowest indices, so the result never depends on the
    sort implementation or the block size. Bits per row: k * (32 + ceil(log2 d)).
    """
    _check_k(ratio, k)

    def select(v: torch.Tensor, ctx: RoundCtx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, d = v.shape
        kk = _num_kept(ratio, k, d)
        a = v.abs()
        tau = torch.topk(a, kk, dim=1).values[:, -1:]
        gt, eq = a > tau, a == tau
        need = kk - gt.sum(1, keepdim=True)
        mask = gt | (eq & (torch.cumsum(eq.to(torch.int64), 1) <= need))
        idx = torch.nonzero(mask)[:, 1].view(m, kk)
        return idx, torch.gather(v, 1, idx), _bits(v, kk * _index_bits(d))
    return _sparsifier(select, lambda d: _num_kept(ratio, k, d) / d, None,
                       lambda d: _num_kept(ratio, k, d))


@COMPRESSORS.register("rand_k")
def rand_k(*, ratio: Ratio | None = None, k: PosInt | None = None, shared_seed: bool = False,
           seed: int | None = None, stream: tuple[int, ...] = ()) -> Compressor:
    """Rand-k: k uniformly random coordinates per row, scaled by d/k (unbiased, omega = d/k - 1).

    The mask of client i in round t is keyed by (seed, COMPRESS, round, i), drawn for the whole
    block at once. Bits per row: k * (32 + ceil(log2 d)); with `shared_seed` the receiver
    regenerates the mask from the shared key and only the k values are counted (k * 32).
    """
    _check_k(ratio, k)

    def select(v: torch.Tensor, ctx: RoundCtx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, d = v.shape
        kk = _num_kept(ratio, k, d)
        idx = torch.topk(_uniform(seed, stream, ctx, d), kk, dim=1, largest=False).indices
        idx = torch.sort(idx, dim=1).values
        ibits = 0 if shared_seed else kk * _index_bits(d)
        return idx, torch.gather(v, 1, idx) * (d / kk), _bits(v, ibits)
    return _sparsifier(select, lambda d: _num_kept(ratio, k, d) / d,
                       lambda d: d / _num_kept(ratio, k, d) - 1, lambda d: _num_kept(ratio, k, d))


@COMPRESSORS.register("qsgd")
def qsgd(*, levels: PosInt = 15, seed: int | None = None, stream: tuple[int, ...] = ()) -> Compressor:
    """QSGD: stochastic rounding of |v_j| / ||v|| to `levels` s uniform levels (unbiased).

    Q(v)_j = ||v||_2 sign(v_j) xi_j, xi_j = (l + 1)/s with probability |v_j| s / ||v|| - l, else
    l/s, l = floor(|v_j| s / ||v||) (Alistarh et al. 2017, Lemma 3.1: omega = min(d/s^2, sqrt(d)/s)).
    Bits per row (the paper's dense encoding estimate): 32 (norm) + d * (1 + ceil(log2(s + 1))).
    """
    s = levels

    def compress(v: torch.Tensor, ctx: RoundCtx) -> tuple[torch.Tensor, torch.Tensor]:
        d = v.shape[1]
        norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        r = v.abs() / torch.where(norm > 0, norm, torch.ones_like(norm)) * s
        low = r.floor()
        up = _uniform(seed, stream, ctx, d) < (r - low).double()
        dec = torch.sign(v) * norm * (low + up.to(v.dtype)) / s
        return dec, _bits(v, FLOAT_BITS + d * (1 + math.ceil(math.log2(s + 1))))
    omega = lambda d: min(d / s**2, math.sqrt(d) / s)  # noqa: E731
    return Compressor(compress, alpha=lambda d: 1 / (1 + omega(d)), omega=omega)


@COMPRESSORS.register("natural")
def natural(*, seed: int | None = None, stream: tuple[int, ...] = ()) -> Compressor:
    """Natural compression: unbiased random rounding of each value to a power of two (omega = 1/8).

    t with 2^e <= |t| < 2^(e+1) becomes sign(t) 2^(e+1) with probability |t|/2^e - 1, else
    sign(t) 2^e (Horváth et al. 2019, arXiv:1905.10988). Bits: 9 per coordinate (sign + 8-bit
    exponent, float32's exponent range).
    """
    def compress(v: torch.Tensor, ctx: RoundCtx) -> tuple[torch.Tensor, torch.Tensor]:
        a = v.abs()
        low = torch.ldexp(torch.ones_like(a), torch.frexp(a).exponent - 1)  # 2^floor(log2 |t|)
        up = _uniform(seed, stream, ctx, v.shape[1]) < (a / low - 1).double()
        return torch.sign(v) * low * (1 + up.to(v.dtype)), _bits(v, 9 * v.shape[1])
    return Compressor(compress, alpha=lambda d: 8 / 9, omega=lambda d: 1 / 8)


@COMPRESSORS.register("chain")
def chain(*, stages: list[dict[str, Any]], seed: int | None = None, stream: tuple[int, ...] = (),
          contractive: bool = False) -> Compressor:
    """Composition of compressors applied in order (e.g. top_k then qsgd on the kept values).

    After a sparsifier (top_k, rand_k) the later stages act on the k kept values only, so the
    bits are the sparsifier's index bits plus the later stages' bits on k values (a real
    encoding). After a dense stage the next stage re-encodes its output; only the last
    encoding is counted. alpha multiplies (exact when a sparsifier is followed by
    support-preserving stages); omega composes as prod(1 + omega_j) - 1 when all are unbiased.
    """
    if not stages:
        raise ConfigError("a chain needs at least one stage", key="stages", value=stages)
    return _compose([build_compressor(c, seed, stream=(*stream, j), contractive=contractive)
                     for j, c in enumerate(stages)])


def _compose(comps: list[Compressor]) -> Compressor:
    if len(comps) == 1:
        return comps[0]
    first, rest = comps[0], _compose(comps[1:])

    def compress(v: torch.Tensor, ctx: RoundCtx) -> tuple[torch.Tensor, torch.Tensor]:
        if first.select is None:
            return rest.compress(first.compress(v, ctx)[0], ctx)
        idx, vals, ibits = first.select(v, ctx)
        dec, bits = rest.compress(vals, ctx)
        return torch.zeros_like(v).scatter(1, idx, dec), ibits + bits
    omega = None if first.omega is None or rest.omega is None else \
        lambda d: (1 + first.omega(d)) * (1 + rest.omega(first.kept(d))) - 1
    return Compressor(compress, lambda d: first.alpha(d) * rest.alpha(first.kept(d)), omega,
                      None, lambda d: rest.kept(first.kept(d)))


def make_contractive(comp: Compressor) -> Compressor:
    """C / (1 + omega) for an unbiased C (alpha = 1/(1 + omega), biased); others unchanged."""
    if comp.omega is None:
        return comp
    f = lambda d: 1.0 / (1.0 + comp.omega(d))  # noqa: E731

    def compress(v: torch.Tensor, ctx: RoundCtx) -> tuple[torch.Tensor, torch.Tensor]:
        dec, bits = comp.compress(v, ctx)
        return dec * f(v.shape[1]), bits

    def select(v: torch.Tensor, ctx: RoundCtx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx, vals, ibits = comp.select(v, ctx)
        return idx, vals * f(v.shape[1]), ibits
    return Compressor(compress, comp.alpha, None, select if comp.select else None, comp.kept)


# ---- configuration --------------------------------------------------------------------------

def _split(cfg: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(cfg, Mapping):
        raise ConfigError("a compressor is a mapping {name: ..., <params>}", value=cfg)
    if "name" not in cfg:
        raise ConfigError("required key is missing", key="name")
    if not isinstance(cfg["name"], str):
        raise ConfigError("compressor name must be a string", key="name", value=cfg["name"])
    return cfg["name"], {k: v for k, v in cfg.items() if k not in ("name", "error_feedback")}


def validate_compressor(cfg: Any, *, _outer: bool = True) -> dict[str, Any]:
    """Validated compressor config with defaults filled (chain stages recursively).

    ConfigError key paths are relative to the compressor ("ratio", "stages.1.levels").
    `error_feedback: bool` is allowed on the outermost mapping only (read by `compress_uplink`).
    """
    name, params = _split(cfg)
    ef = cfg.get("error_feedback")
    if ef is not None and (not _outer or not isinstance(ef, bool)):
        raise ConfigError("error_feedback is a bool of the outermost compressor only",
                          key="error_feedback", value=ef)
    try:
        out = COMPRESSORS.validate(name, params)
    except ConfigError as err:
        raise (err.at(prefix="name") if err.key is None else err) from None
    if name == "chain":
        stages = []
        for j, stage in enumerate(out["stages"]):
            try:
                stages.append(validate_compressor(stage, _outer=False))
            except ConfigError as err:
                raise err.at(prefix=f"stages.{j}") from None
        out["stages"] = stages
    build_compressor({"name": name, **out})  # semantic checks (e.g. ratio vs k)
    return {"name": name, **out, **({} if ef is None else {"error_feedback": ef})}


def build_compressor(cfg: Mapping[str, Any], seed: int | None = None, *, stream: tuple[int, ...] = (),
                     contractive: bool = False) -> Compressor:
    """A Compressor from a config mapping (the `error_feedback` key is ignored here).

    Args:
      seed: root seed of the random streams; None uses `ctx.seed` at call time (the scenario's).
      stream: extra key ids that separate independent uses (payload keys, chain stages).
      contractive: scale unbiased (stages) by 1/(1 + omega) (EF21 and error feedback need this).
    """
    name, params = _split(cfg)
    fn = COMPRESSORS.get(name)
    extra: dict[str, Any] = {"seed": seed, "stream": tuple(stream)}
    if "contractive" in inspect.signature(fn).parameters:
        extra["contractive"] = contractive
    comp = COMPRESSORS.build(name, params, **extra)
    if not isinstance(comp, Compressor):
        raise ConfigError("compressor factory must return a strategies.compress.Compressor", key="name",
                          value=name)
    return make_contractive(comp) if contractive else comp


def _validated_field(cfg: Any) -> dict[str, Any]:
    try:
        return validate_compressor(cfg)
    except ConfigError as err:
        raise err.at(prefix="compressor") from None


CompressorCfg = Annotated[dict[str, Any], AfterValidator(_validated_field)]
"""Type of a strategy factory's `compressor` keyword: validated (recursively) with the strategy."""


from strategies._uplink import EF_PREFIX, compress_uplink  # noqa: E402  (re-export)

__all__ = ["COMPRESSORS", "Compressor", "FLOAT_BITS", "identity", "top_k", "rand_k", "qsgd", "natural",
           "chain", "make_contractive", "CompressorCfg", "validate_compressor", "build_compressor",
           "compress_uplink", "EF_PREFIX"]
