"""Robust aggregation: a plug-in that replaces the weighted sum of any server strategy.

``strategy: {name: fedavg, aggregator: {name: median}}`` (or trimmed-mean, krum, multi-krum, mean):
the engines then gather every participant's payload rows instead of summing them
(`fedsim.types.Strategy.aggregate`, `fedsim.round.gathered_reduce`) and every process computes
the same reduction. For payload key k with weights w_i (the strategy's, summing to W_k) the
weighted sum sum_i w_i v_i = W_k * (weighted mean) becomes W_k * (robust location of the rows),
so strategies whose weights do not sum to one (SCAFFOLD's dc over all N) keep their meaning.
The coordinate-wise rules and Krum ignore the individual weights (as in the papers); `mean`
uses them and equals the weighted-sum path (a check of the gather path).

References:
  Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
  Statistical Rates", ICML 2018, arXiv:1803.01498 (coordinate-wise median and trimmed mean).
  Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
  Tolerant Gradient Descent", NeurIPS 2017 (Krum and Multi-Krum).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, NamedTuple

import torch
from annotated_types import Ge, Lt

from fedsim.constraints import NonNegativeInt, PositiveInt
from fedsim.registry import Registry
from fedsim.types import RoundCtx, Strategy, Tree

AGGREGATORS = Registry("aggregators", builtins=("fedsim.robust",), self_describing=True)

Combine = Callable[[Tree, Tree, RoundCtx], Tree]
"""(rows {k: [M, ...]}, weights {k: [M]} summing to 1, ctx) -> {k: [...]} location estimates."""
Fits = Callable[[int], "tuple[str, str] | None"]
"""M participants -> None, or (parameter, why M are too few)."""


def _fits_any(m: int) -> tuple[str, str] | None:
    return None


class Aggregator(NamedTuple):
    """A robust aggregation rule (registered in `AGGREGATORS`; `spec` is its scenario mapping)."""

    combine: Combine
    fits: Fits = _fits_any
    spec: Mapping[str, Any] | None = None


def _flat(rows: Tree) -> tuple[torch.Tensor, list[tuple[str, torch.Size, int]]]:
    """Rows of every key side by side: [M, D] and (key, row shape, width) to split them back."""
    keys = sorted(rows)
    layout = [(k, rows[k].shape[1:], rows[k][0].numel() if rows[k].shape[0] else 0) for k in keys]
    return torch.cat([rows[k].reshape(rows[k].shape[0], -1) for k in keys], dim=1), layout


def _split(v: torch.Tensor, layout: list[tuple[str, torch.Size, int]]) -> Tree:
    out, at = {}, 0
    for k, shape, width in layout:
        out[k] = v[at:at + width].reshape(shape)
        at += width
    return out


def coordinate_median(v: torch.Tensor) -> torch.Tensor:
    """[M, D] -> [D]: the median of each coordinate (the mean of the two middle values for even M)."""
    s, _ = torch.sort(v, dim=0)
    m = v.shape[0]
    return s[m // 2] if m % 2 else 0.5 * (s[m // 2 - 1] + s[m // 2])


def trimmed(v: torch.Tensor, beta: float) -> torch.Tensor:
    """[M, D] -> [D]: per coordinate, the mean after dropping the floor(beta M) largest and smallest."""
    s, _ = torch.sort(v, dim=0)
    b = int(beta * v.shape[0])
    return s[b:v.shape[0] - b].mean(0)


def krum_scores(v: torch.Tensor, f: int) -> torch.Tensor:
    """[M, D] -> [M]: sum of squared distances to the M - f - 2 nearest other rows (Blanchard et al.)."""
    d2 = torch.cdist(v[None], v[None], compute_mode="donot_use_mm_for_euclid_dist")[0] ** 2
    near, _ = torch.sort(d2, dim=1)
    return near[:, 1:v.shape[0] - f - 1].sum(1)   # column 0 is the row itself (distance 0)


def krum_select(v: torch.Tensor, f: int, select: int) -> torch.Tensor:
    """Indices [select] of the rows with the lowest Krum scores (ties: lowest index first)."""
    order = torch.sort(krum_scores(v, f), stable=True).indices
    return order[:select]


def _coordinatewise(rule: Callable[[torch.Tensor], torch.Tensor]) -> Combine:
    def combine(rows: Tree, w: Tree, ctx: RoundCtx) -> Tree:
        return {k: rule(v.reshape(v.shape[0], -1)).reshape(v.shape[1:]) for k, v in rows.items()}
    return combine


@AGGREGATORS.register("mean")
def mean() -> Aggregator:
    """The strategy's own weighted mean, computed from the gathered rows (equals the weighted sum)."""
    def combine(rows: Tree, w: Tree, ctx: RoundCtx) -> Tree:
        return {k: torch.tensordot(w[k].to(v.dtype), v, dims=([0], [0])) for k, v in rows.items()}
    return Aggregator(combine)


@AGGREGATORS.register("median")
def median() -> Aggregator:
    """Coordinate-wise median (Yin et al., ICML 2018)."""
    return Aggregator(_coordinatewise(coordinate_median))


@AGGREGATORS.register("trimmed-mean")
def trimmed_mean(*, beta: Annotated[float, Ge(0), Lt(0.5)] = 0.1) -> Aggregator:
    """Coordinate-wise beta-trimmed mean (Yin et al., ICML 2018): drop floor(beta M) at each end.

    Args:
      beta: the fraction trimmed from EACH side, in [0, 0.5) (0: the plain mean).
    """
    return Aggregator(_coordinatewise(lambda v: trimmed(v, beta)))


def _krum_fits(f: int, select: int | None) -> Fits:
    def fits(m: int) -> tuple[str, str] | None:
        if m < 2 * f + 3:
            return "f", (f"Krum with f = {f} needs at least 2f + 3 = {2 * f + 3} participants per round, "
                         f"got {m} (f <= {max((m - 3) // 2, 0)} fits)")
        if select is not None and select > m - f:
            return "select", f"Multi-Krum selects at most M - f = {m - f} of {m} participants, got {select}"
        return None
    return fits


def _krum(f: int, select: int | None) -> Aggregator:
    fits = _krum_fits(f, select)

    def combine(rows: Tree, w: Tree, ctx: RoundCtx) -> Tree:
        v, layout = _flat(rows)
        m = v.shape[0]
        bad = fits(m)
        if bad is not None:
            raise RuntimeError(f"round {ctx.round}: aggregator.{bad[0]}: {bad[1]}")
        chosen = krum_select(v, f, select if select is not None else m - f)
        return _split(v[chosen].mean(0), layout)
    return Aggregator(combine, fits)


@AGGREGATORS.register("krum")
def krum(*, f: NonNegativeInt = 1) -> Aggregator:
    """Krum (Blanchard et al., NeurIPS 2017): the row closest to its M - f - 2 neighbours.

    Rows are compared on all payload keys together (one client, one point); needs M >= 2f + 3.

    Args:
      f: the number of Byzantine clients tolerated.
    """
    return _krum(f, 1)


@AGGREGATORS.register("multi-krum")
def multi_krum(*, f: NonNegativeInt = 1, select: PositiveInt | None = None) -> Aggregator:
    """Multi-Krum (Blanchard et al., NeurIPS 2017): the mean of the `select` best Krum rows.

    Args:
      f: the number of Byzantine clients tolerated (needs M >= 2f + 3).
      select: rows averaged (null: M - f; 1 is Krum).
    """
    return _krum(f, select)


def with_aggregator(strategy: Strategy, agg: Aggregator) -> Strategy:
    """`strategy` whose reduction is `agg` instead of the weighted sum (see the module docstring)."""
    if strategy.comm != "reduce":
        raise ValueError("aggregator: gossip strategies mix with their neighbours, they have no server "
                         "aggregate to make robust")

    def aggregate(server: Tree, rows: Tree, ctx: RoundCtx) -> Tree:
        w = strategy.weights(server, ctx) if strategy.weights else ctx.weight
        per_key = {k: (w[k] if isinstance(w, dict) else w).to(rows[k].dtype) for k in rows}
        total = {k: per_key[k].sum() for k in rows}
        unit = {k: per_key[k] / torch.where(total[k] == 0, 1.0, total[k]) for k in rows}
        est = agg.combine(rows, unit, ctx)
        return {k: total[k] * est[k] for k in rows}

    return strategy._replace(aggregate=aggregate)


def fixed_participants(kind: str, participation: Any) -> int | None:
    """Participants per round when the pattern fixes it (full, uniform), else None (random)."""
    if kind in ("full", "uniform"):
        return int(participation.mask(0).sum())
    return None


__all__ = ["AGGREGATORS", "Aggregator", "with_aggregator", "fixed_participants", "coordinate_median",
           "trimmed", "krum_scores", "krum_select"]
