"""CO2: local updating with a one-step-stale outer all-reduce; Local SGD and SlowMo as its special cases.

References:
  Sun, Qin, Sun, Li, Li, Shen, Qiao, Zhong, "CO2: Efficient Distributed Training with Full
  Communication-Computation Overlap", ICLR 2024, arXiv:2401.16265 (Algorithm 1, Sec. 3).
  Wang, Tantia, Ballas, Rabbat, "SlowMo: Improving Communication-Efficient Distributed SGD with
  Slow Momentum", ICLR 2020, arXiv:1910.00643 (staleness 0, beta > 0).
  Stich, "Local SGD Converges Fast and Communicates Little", ICLR 2019, arXiv:1805.09767
  (staleness 0, beta 0, alpha 1: periodic averaging).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from annotated_types import Ge

from fedsim.constraints import Momentum, NonNegativeFloat, PositiveFloat, PositiveInt
from fedsim.types import LocalOptimizer, Oracle, RoundCtx, Strategy, Tree
from strategies import STRATEGIES
from strategies.fedavg import participant_weights
from strategies.local import broadcast_rows, run_local, sgd

Weighting = Literal["samples", "uniform"]
SGD = sgd()
OUTER_MOMENTUM = 0.2
"""Default outer momentum beta of `co2` and `slowmo` (one value, so that default-vs-default
comparisons differ only in the algorithm): the CO2 README / example value and fairseq-CO2's rule
for 17-32 workers; the fairscale constructors default to 0.5, which diverges with staleness."""


@dataclass(frozen=True)
class ConstPenalty:
    """Lambda = value: the released code's constant `co2_gap_penalty` (default 1.0)."""

    kind: Literal["const"] = "const"
    value: Annotated[float, Ge(1)] = 1.0


@dataclass(frozen=True)
class GapNormPenalty:
    """Lambda = 1 + scale * ||gap||_2 / ||1||_2 (a scalar, the RMS gap): the recalled paper form,
    unverified."""

    kind: Literal["gap_norm"] = "gap_norm"
    scale: NonNegativeFloat = 1.0


@dataclass(frozen=True)
class GapElementwisePenalty:
    """Lambda = 1 + scale * |gap| per coordinate (Gap-Aware style, arXiv:1909.10802)."""

    kind: Literal["gap_elementwise"] = "gap_elementwise"
    scale: NonNegativeFloat = 1.0


@dataclass(frozen=True)
class NoClip:
    """No clipping of the outer momentum (what the released code effectively does)."""

    kind: Literal["none"] = "none"


@dataclass(frozen=True)
class ElementwiseClip:
    """Clamp every coordinate of m to [-threshold, threshold] (what the released code intends)."""

    kind: Literal["elementwise"] = "elementwise"
    threshold: PositiveFloat = 1.0


@dataclass(frozen=True)
class NormClip:
    """Rescale m to ||m||_2 <= threshold."""

    kind: Literal["norm"] = "norm"
    threshold: PositiveFloat = 1.0


Penalty = ConstPenalty | GapNormPenalty | GapElementwisePenalty
Clip = NoClip | ElementwiseClip | NormClip
UNIT = ConstPenalty()
NO_CLIP = NoClip()


def gap_penalty(penalty: Penalty, gap: torch.Tensor) -> torch.Tensor | float:
    """Lambda_t >= 1 dividing the stale pseudo-gradient; gap = x_{t,0} - xbar_{t-1,tau} [P]."""
    if isinstance(penalty, ConstPenalty):
        return penalty.value
    if isinstance(penalty, GapNormPenalty):
        return 1 + penalty.scale * gap.norm() / math.sqrt(gap.numel())
    return 1 + penalty.scale * gap.abs()


def clip_momentum(clip: Clip, m: torch.Tensor) -> torch.Tensor:
    """Outer-momentum clipping: element-wise clamp to [-phi, phi], or rescale to ||m||_2 <= phi."""
    if isinstance(clip, ElementwiseClip):
        return m.clamp(-clip.threshold, clip.threshold)
    if isinstance(clip, NormClip):
        phi = clip.threshold
        return m * (phi / m.norm()).clamp(max=1.0) if math.isfinite(phi) else m
    return m


def outer_step_strategy(*, tau: int, lr: float, inner: LocalOptimizer, outer_lr: float, beta: float,
                        staleness: int, penalty: Penalty = UNIT, clip: Clip = NO_CLIP,
                        weighting: str = "uniform") -> Strategy:
    """The one implementation behind `co2`, `slowmo` and `local-sgd` (see `co2` for the math)."""
    if not staleness and not isinstance(penalty, ConstPenalty):
        raise ValueError("penalty: a gap penalty needs staleness 1 (without staleness there is no "
                         "gap); use {kind: const}")

    def init_server(x0: torch.Tensor) -> Tree:
        server = {"x": x0.clone(), "m": torch.zeros_like(x0)}
        return {**server, "x_prev": x0.clone()} if staleness else server

    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        x = broadcast_rows(server["x"], ctx.m)
        run = run_local(x, oracle, tau, lr, inner, state=clients, budget=ctx.steps)
        return {"delta": run.y - x}, run.state, {"loss": run.loss}

    def init_clients(x0: torch.Tensor, ids: torch.Tensor) -> Tree:
        return inner.init(x0.new_zeros((ids.numel(), x0.shape[-1])))

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        # With staleness the reduction is the one launched a round ago, from anchor x_{t-1,0}.
        anchor = server["x_prev"] if staleness else server["x"]
        out = {**server, "x_prev": server["x"]} if staleness else dict(server)
        if not reduced:
            return out
        pseudo = -reduced["delta"]                                   # x_{t-1,0} - xbar_{t-1,tau}
        lam = penalty.value if isinstance(penalty, ConstPenalty) else \
            gap_penalty(penalty, server["x"] - (anchor + reduced["delta"]))
        m = beta * server["m"] + (pseudo if isinstance(lam, float) and lam == 1.0 else pseudo / lam)
        m = clip_momentum(clip, m)
        return {**out, "m": m, "x": server["x"] - outer_lr * m}

    return Strategy(init_server=init_server, init_clients=init_clients, local=local,
                    server_update=server_update, staleness=staleness,
                    weights=lambda server, ctx: participant_weights(weighting, ctx), local_steps=tau)


@STRATEGIES.register("co2")
def co2(*, tau: PositiveInt = 8, lr: PositiveFloat = 0.05, inner: LocalOptimizer = SGD,
        outer_lr: PositiveFloat = 1.0, beta: Momentum = OUTER_MOMENTUM, staleness: Literal[0, 1] = 1,
        penalty: Penalty = UNIT, clip: Clip = NO_CLIP, weighting: Weighting = "uniform") -> Strategy:
    """CO2 (Sun et al. 2024): tau inner steps, outer momentum step applied one round late.

    Round t: every participant starts from the outer model x_{t,0}, runs `tau` steps of its
    inner optimizer (state persists per client across rounds) and sends
    Delta_i = x^{(i)}_{t,tau} - x_{t,0}. With staleness 1 the server update of round t receives
    the reduction of round t-1 (in a real system that all-reduce overlapped round t's compute;
    round 0 receives nothing and leaves x unchanged); it keeps x_{t-1,0} to interpret it:
      D = x_{t-1,0} - xbar_{t-1,tau} = -sum_i w_i Delta_i,  gap = x_{t,0} - xbar_{t-1,tau}
      m <- clip(beta m + D / Lambda(gap), phi);  x_{t+1,0} = x_{t,0} - outer_lr * m.
    staleness 0 uses the current round (D = x_{t,0} - xbar_{t,tau}, no gap): SlowMo, and with
    beta 0, outer_lr 1, Lambda 1 it is Local SGD. An empty reduction leaves x and m unchanged.

    Defaults follow the released code (weigao266/fairscale-CO2): a constant penalty 1.0 and no
    clipping (its `_co2_clip` discards the clamp it computes, so it never clipped). The paper's
    exact Lambda_t could not be verified (docs/algorithms.md#co2-penalty-and-clipping): the gap
    forms are opt-ins, `{kind: gap_norm, scale: s}` the recalled 1 + s ||gap|| / ||1|| and
    `{kind: gap_elementwise, scale: s}` a per-coordinate variant (the RMS gap of NN weights is
    tiny, so at scale 1 `gap_norm` is close to 1). Penalty and clipping are inert near a fixed
    point (gap -> 0, small m): they bound transients but cannot stabilise a linearly unstable
    (outer_lr, beta). With staleness, heavy ball needs outer_lr * k < 1 - beta along every
    curvature h, k = 1 - (1 - lr h)^tau being the share of the way to the local optimum that
    tau inner steps cover; hence beta 0.2 (the CO2 README / example value, shared with
    `slowmo`), where the fairscale constructor's 0.5 diverges wherever k > 0.5. tau 8 suits CPU
    scale (the code's outer frequency is 48 in fairscale, 20 in fairseq).
    Partial participation: D averages the participants of round t-1, all starting from
    x_{t-1,0}; non-participants keep their inner state until they next take part.

    Args:
      tau: inner steps per round. lr: inner step size. inner: the workers' optimizer
        (`strategies.local`: {name: sgd}, {name: momentum, mass: 0.9}, {name: adamw, beta1: ...},
        each with its own weight_decay); its state persists per worker across rounds.
      outer_lr: alpha. beta: outer momentum. staleness: 1 (CO2) or 0 (no overlap; a gap
        penalty then has no gap and is refused).
      penalty: Lambda_t, one of {kind: const, value: >= 1}, {kind: gap_norm, scale: >= 0},
        {kind: gap_elementwise, scale: >= 0} (or the bare kind for its defaults).
      clip: {kind: none}, {kind: elementwise, threshold: phi} or {kind: norm, threshold: phi}.
      weighting: "uniform" (all-reduce mean, the paper) or "samples" (n_i / sum n_j).

    Shapes: server {"x", "m", "x_prev" (staleness 1)}: [P]; payload {"delta": [m, P]}; client
    state: the inner optimizer's (momentum {"buf": [m, P]}, adamw {"m1", "m2": [m, P],
    "step": [m]}, sgd none).
    """
    return outer_step_strategy(tau=tau, lr=lr, inner=inner, outer_lr=outer_lr, beta=beta,
                               staleness=staleness, penalty=penalty, clip=clip, weighting=weighting)


@STRATEGIES.register("slowmo")
def slowmo(*, tau: PositiveInt = 8, lr: PositiveFloat = 0.05, inner: LocalOptimizer = SGD,
           outer_lr: PositiveFloat = 1.0, beta: Momentum = OUTER_MOMENTUM,
           weighting: Weighting = "uniform") -> Strategy:
    """SlowMo (Wang et al. 2020, arXiv:1910.00643): `co2` with staleness 0, no penalty, no clipping.

    m <- beta m + (x_{t,0} - xbar_{t,tau}); x_{t+1,0} = x_{t,0} - outer_lr * m. The defaults are
    `co2`'s (beta 0.2, outer_lr 1, tau 8), so that `slowmo` vs `co2` isolates the staleness;
    fairscale's SlowMo defaults to beta 0.5 and its docstring reports tuned values from 0 to
    0.6 by node count. Parameters as in `co2`.
    """
    return outer_step_strategy(tau=tau, lr=lr, inner=inner, outer_lr=outer_lr, beta=beta,
                               staleness=0, weighting=weighting)


@STRATEGIES.register("local-sgd")
def local_sgd(*, tau: PositiveInt = 8, lr: PositiveFloat = 0.05, inner: LocalOptimizer = SGD,
              weighting: Weighting = "uniform") -> Strategy:
    """Local SGD (Stich 2019, arXiv:1805.09767): tau inner steps, then x_{t+1,0} = mean of the end points.

    `co2` with staleness 0, beta 0, outer_lr 1, no penalty, no clipping; with inner "sgd" it is
    FedAvg with uniform weights. Inner state (momentum) persists per worker across rounds.
    """
    return outer_step_strategy(tau=tau, lr=lr, inner=inner, outer_lr=1.0, beta=0.0, staleness=0,
                               weighting=weighting)


__all__ = ["co2", "slowmo", "local_sgd", "ConstPenalty", "GapNormPenalty", "GapElementwisePenalty",
           "NoClip", "ElementwiseClip", "NormClip", "Penalty", "Clip"]
