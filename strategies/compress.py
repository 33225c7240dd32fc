"""Compression operators: row-wise transforms of [m, d] client messages (`fedsim.types.Compressor`).

A compressor returns what the receiver decodes and an `Encoding` of what a real encoding of each
row sends: float values (counted at the payload dtype's width by `fedsim.round.row_bytes`) plus
other bits (indices: ceil(log2 d) each; signs, exponents, quantisation levels). Randomness (rand_k
masks, stochastic rounding) is keyed by (seed, COMPRESS, *stream, round, client id, coordinate)
through `fedsim.rng`, so a row compresses the same way whatever chunk, rank or process it is in.
Contraction parameters (E||C(v) - v||^2 <= (1 - alpha) ||v||^2) are functions of d: `alpha(d)` is
that of the *contractive form* (the compressor itself when biased, C / (1 + omega) when unbiased
with variance omega; `contractive`). The operators here are stateless; error feedback (EF14,
EF21, EControl) are stateful wrappers in `strategies.feedback`.

Scenario form: ``{name: top_k, ratio: 0.01}``, ``{name: chain, stages: [{name: top_k, k: 10},
{name: qsgd}]}``; in Python ``top_k(ratio=0.01)``, ``chain(stages=[top_k(k=10), qsgd()])``.

References: Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018, arXiv:1809.07599
(top_k, rand_k); Alistarh et al., "QSGD", NeurIPS 2017, arXiv:1610.02132; Horváth et al.,
"Natural Compression for Distributed Deep Learning", arXiv:1905.10988.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from fedsim import rng
from fedsim.constraints import Fraction, PositiveInt
from fedsim.types import Compressor, Encoding, RoundCtx, Tree
from strategies import COMPRESSORS

Stream = tuple[int, ...]
Encode = Callable[[torch.Tensor, Tree, RoundCtx, Stream], tuple[torch.Tensor, Encoding, Tree]]


class Transform(NamedTuple):
    """A `fedsim.types.Compressor` as a NamedTuple of functions, plus its constants.

    Attributes:
      init / compress / init_receiver / receive: the protocol's two halves.
      alpha: d -> contraction parameter of the contractive form (1 for identity, k/d for top_k).
      omega: d -> variance parameter when unbiased (E C(v) = v, E||C(v) - v||^2 <= omega ||v||^2),
        None when biased.
      kept: d -> number of values a decoded row can hold (k for sparsifiers).
      stages: the members of a `chain` (its contractive form is the chain of theirs).
      spec: the ``{name: ..., <params>}`` mapping it was built from (filled by the registry).
    """

    init: Callable[[torch.Tensor], Tree]
    compress: Encode
    init_receiver: Callable[[torch.Tensor], Tree]
    receive: Callable[[torch.Tensor, Tree], tuple[torch.Tensor, Tree]]
    alpha: Callable[[int], float]
    omega: Callable[[int], float] | None = None
    kept: Callable[[int], int] = lambda d: d
    stages: tuple[Transform, ...] = ()
    spec: Mapping[str, Any] | None = None


def _empty(v: torch.Tensor) -> Tree:
    return {}


def _passthrough(reduced: torch.Tensor, state: Tree) -> tuple[torch.Tensor, Tree]:
    return reduced, state


def stateless(encode: Callable[[torch.Tensor, RoundCtx, Stream], tuple[torch.Tensor, Encoding]],
              alpha: Callable[[int], float], omega: Callable[[int], float] | None) -> Transform:
    """A Transform without state on either side from `encode(v, ctx, stream)`."""
    def compress(v: torch.Tensor, state: Tree, ctx: RoundCtx, stream: Stream = ()
                 ) -> tuple[torch.Tensor, Encoding, Tree]:
        return (*encode(v, ctx, stream), state)
    return Transform(_empty, compress, _empty, _passthrough, alpha, omega)


def _full(v: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((v.shape[0],), float(value), dtype=torch.float64, device=v.device)


def index_bits(d: int) -> int:
    """Bits of one coordinate index of a d-vector."""
    return math.ceil(math.log2(d)) if d > 1 else 0


def _uniform(stream: Stream, ctx: RoundCtx, d: int) -> torch.Tensor:
    """[m, d] float64 uniforms keyed by (seed, COMPRESS, *stream, round, client id, coordinate)."""
    pos = torch.arange(d, device=ctx.ids.device)
    return rng.uniform_torch(ctx.seed, rng.COMPRESS, *stream, ctx.round, ctx.ids[:, None],
                             pos[None, :], device=ctx.ids.device)


def _num_kept(ratio: float | None, k: int | None, d: int) -> int:
    if k is not None:
        return min(k, d)
    assert ratio is not None
    return max(1, min(d, math.ceil(ratio * d - 1e-9)))  # tolerance: 0.1 * 30 is 3.0000000000000004


def _check_k(ratio: float | None, k: int | None) -> None:
    if (ratio is None) == (k is None):
        raise ValueError("ratio: give exactly one of ratio (fraction of coordinates) or k (count)")


def _sparse(v: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, ibits: int
            ) -> tuple[torch.Tensor, Encoding]:
    """Scatter the kept values; encoding = k values + k indices of `ibits` bits, support `idx`."""
    k = idx.shape[1]
    return torch.zeros_like(v).scatter(1, idx, vals), Encoding(_full(v, k), _full(v, k * ibits), idx)


@COMPRESSORS.register("identity")
def identity() -> Transform:
    """No compression: the dense row (alpha = 1, omega = 0)."""
    return stateless(lambda v, ctx, s: (v.clone(), Encoding(_full(v, v.shape[1]), _full(v, 0))),
                     alpha=lambda d: 1.0, omega=lambda d: 0.0)


@COMPRESSORS.register("top_k")
def top_k(*, ratio: Fraction | None = None, k: PositiveInt | None = None) -> Transform:
    """Top-k: keep the k largest |v_j| of each row (biased, deterministic, alpha = k/d).

    Args:
      ratio: k = ceil(ratio * d) (at least 1); or k: a fixed count (capped at d).

    Ties at the k-th magnitude go to the lowest indices, so the result never depends on the
    sort implementation or the block size. Sends k values and k indices per row.
    """
    _check_k(ratio, k)

    def encode(v: torch.Tensor, ctx: RoundCtx, stream: Stream) -> tuple[torch.Tensor, Encoding]:
        m, d = v.shape
        kk = _num_kept(ratio, k, d)
        a = v.abs()
        tau = torch.topk(a, kk, dim=1).values[:, -1:]
        gt, eq = a > tau, a == tau
        need = kk - gt.sum(1, keepdim=True)
        mask = gt | (eq & (torch.cumsum(eq.to(torch.int64), 1) <= need))
        idx = torch.nonzero(mask)[:, 1].view(m, kk)
        return _sparse(v, idx, torch.gather(v, 1, idx), index_bits(d))
    return stateless(encode, lambda d: _num_kept(ratio, k, d) / d, None)._replace(
        kept=lambda d: _num_kept(ratio, k, d))


@COMPRESSORS.register("rand_k")
def rand_k(*, ratio: Fraction | None = None, k: PositiveInt | None = None,
           shared_seed: bool = False) -> Transform:
    """Rand-k: k uniformly random coordinates per row, scaled by d/k (unbiased, omega = d/k - 1).

    The mask of client i in round t is keyed by (seed, COMPRESS, round, i), drawn for the whole
    block at once. Sends k values and k indices; with `shared_seed` the receiver regenerates
    the mask from the shared key and only the k values are counted.
    """
    _check_k(ratio, k)

    def encode(v: torch.Tensor, ctx: RoundCtx, stream: Stream) -> tuple[torch.Tensor, Encoding]:
        d = v.shape[1]
        kk = _num_kept(ratio, k, d)
        idx = torch.topk(_uniform(stream, ctx, d), kk, dim=1, largest=False).indices
        idx = torch.sort(idx, dim=1).values
        return _sparse(v, idx, torch.gather(v, 1, idx) * (d / kk), 0 if shared_seed else index_bits(d))
    return stateless(encode, lambda d: _num_kept(ratio, k, d) / d,
                     lambda d: d / _num_kept(ratio, k, d) - 1)._replace(kept=lambda d: _num_kept(ratio, k, d))


@COMPRESSORS.register("qsgd")
def qsgd(*, levels: PositiveInt = 15) -> Transform:
    """QSGD: stochastic rounding of |v_j| / ||v|| to `levels` s uniform levels (unbiased).

    Q(v)_j = ||v||_2 sign(v_j) xi_j, xi_j = (l + 1)/s with probability |v_j| s / ||v|| - l, else
    l/s, l = floor(|v_j| s / ||v||) (Alistarh et al. 2017, Lemma 3.1: omega = min(d/s^2, sqrt(d)/s)).
    Sends (the paper's dense encoding estimate) the norm (one value) and d * (1 + ceil(log2(s + 1)))
    bits of signs and levels.
    """
    s = levels

    def encode(v: torch.Tensor, ctx: RoundCtx, stream: Stream) -> tuple[torch.Tensor, Encoding]:
        d = v.shape[1]
        norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        r = v.abs() / torch.where(norm > 0, norm, torch.ones_like(norm)) * s
        low = r.floor()
        up = _uniform(stream, ctx, d) < (r - low).double()
        dec = torch.sign(v) * norm * (low + up.to(v.dtype)) / s
        return dec, Encoding(_full(v, 1), _full(v, d * (1 + math.ceil(math.log2(s + 1)))))

    def omega(d: int) -> float:
        return min(d / s**2, math.sqrt(d) / s)
    return stateless(encode, lambda d: 1 / (1 + omega(d)), omega)


@COMPRESSORS.register("natural")
def natural() -> Transform:
    """Natural compression: unbiased random rounding of each value to a power of two (omega = 1/8).

    t with 2^e <= |t| < 2^(e+1) becomes sign(t) 2^(e+1) with probability |t|/2^e - 1, else
    sign(t) 2^e (Horváth et al. 2019, arXiv:1905.10988). Sends a sign and an exponent per
    coordinate (1 + 8 bits for float32 payloads, 1 + 11 for float64).
    """
    def encode(v: torch.Tensor, ctx: RoundCtx, stream: Stream) -> tuple[torch.Tensor, Encoding]:
        a = v.abs()
        low = torch.ldexp(torch.ones_like(a), torch.frexp(a).exponent - 1)  # 2^floor(log2 |t|)
        up = _uniform(stream, ctx, v.shape[1]) < (a / low - 1).double()
        exponent = 8 if v.element_size() <= 4 else 11
        return torch.sign(v) * low * (1 + up.to(v.dtype)), Encoding(_full(v, 0),
                                                                    _full(v, (1 + exponent) * v.shape[1]))
    return stateless(encode, alpha=lambda d: 8 / 9, omega=lambda d: 1 / 8)


@COMPRESSORS.register("chain")
def chain(*, stages: list[Compressor]) -> Transform:
    """Composition of stateless compressors applied in order (e.g. top_k, then qsgd on the kept values).

    After a sparsifier (its encoding has `indices`) the later stages act on the k kept values
    only, so the cost is the support's indices plus the later stages' encoding of k values (a
    real encoding). After a dense stage the next stage re-encodes its output and only the last
    encoding is counted. alpha multiplies (exact when a sparsifier is followed by
    support-preserving stages); omega composes as prod(1 + omega_j) - 1 when all are unbiased.
    """
    if not stages:
        raise ValueError("stages: a chain needs at least one stage")
    parts: tuple[Transform, ...] = tuple(stages)  # type: ignore[arg-type]

    def encode(v: torch.Tensor, ctx: RoundCtx, stream: Stream) -> tuple[torch.Tensor, Encoding]:
        d = v.shape[1]
        dec, enc = v, Encoding(_full(v, d), _full(v, 0))
        support: torch.Tensor | None = None
        support_bits = _full(v, 0)
        for j, stage in enumerate(parts):
            sub = (*stream, j)
            if support is None:
                dec, enc, _ = stage.compress(dec, {}, ctx, sub)
                if enc.indices is not None:
                    support, support_bits = enc.indices, enc.bits
                continue
            kept, e, _ = stage.compress(torch.gather(dec, 1, support), {}, ctx, sub)
            if e.indices is not None:   # a sparsifier of the kept values: its support in d-space
                support = torch.gather(support, 1, e.indices)
                support_bits = e.values * index_bits(d)
                kept = torch.gather(kept, 1, e.indices)
                enc = Encoding(e.values, support_bits, support)
            else:
                enc = Encoding(e.values, support_bits + e.bits, support)
            dec = torch.zeros_like(dec).scatter(1, support, kept)
        return dec, enc

    def widths(d: int) -> list[int]:
        out = [d]
        for stage in parts:
            out.append(stage.kept(out[-1]))
        return out

    def alpha(d: int) -> float:
        return math.prod(stage.alpha(w) for stage, w in zip(parts, widths(d)[:-1], strict=True))

    omega = None
    if all(stage.omega is not None for stage in parts):
        def omega(d: int) -> float:
            pairs = zip(parts, widths(d)[:-1], strict=True)
            return math.prod(1 + stage.omega(w) for stage, w in pairs) - 1  # type: ignore[misc]
    return stateless(encode, alpha, omega)._replace(stages=parts, kept=lambda d: widths(d)[-1])


def require_stateless(comp: Compressor, key: str, why: str) -> None:
    """ValueError naming `key` unless `comp` keeps no sender state (a plain operator or chain)."""
    if comp.init(torch.zeros(1, 1)):
        raise ValueError(f"{key}: {why}; give a stateless compressor (identity, top_k, rand_k, "
                         "qsgd, natural or a chain of them)")


def contractive(comp: Transform) -> Transform:
    """The contractive form: C / (1 + omega) for an unbiased C (alpha = 1/(1 + omega), biased);
    a chain of the contractive forms of its stages; biased compressors unchanged.

    Error feedback (EF14, EF21, EControl) and CHOCO-SGD need E||C(v) - v||^2 <= (1 - alpha) ||v||^2.
    """
    if comp.stages:
        return chain(stages=[contractive(s) for s in comp.stages])._replace(spec=comp.spec)
    if comp.omega is None:
        return comp
    omega = comp.omega

    def compress(v: torch.Tensor, state: Tree, ctx: RoundCtx, stream: Stream = ()
                 ) -> tuple[torch.Tensor, Encoding, Tree]:
        dec, enc, state = comp.compress(v, state, ctx, stream)
        return dec / (1.0 + omega(v.shape[1])), enc, state
    return comp._replace(compress=compress, omega=None)


__all__ = ["Transform", "stateless", "require_stateless", "index_bits", "identity", "top_k", "rand_k",
           "qsgd", "natural",
           "chain", "contractive"]
