"""DP-FedAvg: client-level differential privacy by update clipping and Gaussian noise on the aggregate,
with fixed or adaptive (quantile-tracking) clipping and an RDP accountant.

References:
  McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
  ICLR 2018, arXiv:1710.06963 (Algorithm 1, DP-FedAvg, the fixed-denominator estimator f~_f).
  Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping",
  NeurIPS 2021, arXiv:1905.03871 (Algorithm 1: geometric update of the clip towards a target
  quantile of the update norms, from noised clipped-or-not bits; Theorem 1 for the noise split).
  Accounting: Mironov, "Renyi Differential Privacy", CSF 2017, and the Poisson-subsampled
  Gaussian mechanism, computed by Google's `dp-accounting` (the `dp` extra).

One round with expected participant count m = sum_n p_n (the participation pattern's rates),
clip C, noise multiplier z and z_D (= z with a fixed clip):
    Delta_i <- Delta_i min(1, C / ||Delta_i||)                       (client)
    Delta   =  (sum_S Delta_i + z_D C N(0, I)) / m                   (server; noise keyed
    x      <-  x + server_lr Delta                                     by (seed, DP, round))
Adaptive clipping: client i also sends b_i = [||Delta_i|| <= C] and the server, with count
noise sigma_b (default 0.05 m),
    b = (sum_S (b_i - 1/2) + sigma_b N(0, 1)) / m + 1/2,   C <- C exp(-clip_lr (b - target_quantile)),
    z_D = (z^-2 - (2 sigma_b)^-2)^(-1/2),
so that the round as a whole is the Gaussian mechanism with multiplier z (Andrew et al., Thm 1).
A round nobody joins still adds the noise (Delta = noise / m): the mechanism's output does not
reveal that the sample was empty.

The accountant reports (epsilon, delta) after t + 1 rounds of the Poisson-subsampled Gaussian
mechanism with sampling rate q (the clients' common participation rate) and multiplier z; that is
the guarantee for `bernoulli` participation with one p and for `full` (q = 1). For `uniform`
(k of N without replacement) it is the customary approximation q = k / N; for markov or cyclic
participation the Poisson assumption does not hold.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from fedsim import rng
from fedsim.constraints import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, Probability
from fedsim.types import Oracle, RoundCtx, Strategy, StrategyRuntime, Tree, no_clients
from strategies import STRATEGIES
from strategies.local import local_delta


def clip_rows(delta: torch.Tensor, clip: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows scaled to norm <= clip [m, P], unclipped bits b_i = [||row|| <= clip] [m, 1])."""
    norm = delta.norm(dim=1, keepdim=True)
    scale = torch.clamp(clip / norm.clamp_min(1e-30), max=1.0)
    return delta * scale, (norm <= clip).to(delta.dtype)


def value_noise(z: float, sigma_b: float) -> float:
    """z_D: the update's noise multiplier that leaves the round at multiplier z when the bits
    get count noise sigma_b (Andrew et al. 2021, Theorem 1); z itself when sigma_b = 0."""
    if z == 0 or sigma_b == 0:
        return z
    if z >= 2 * sigma_b:
        raise ValueError(f"clip_count_stddev: must exceed noise_multiplier / 2 = {z / 2:g} for the "
                         f"split of the privacy budget, got {sigma_b:g}")
    return float((z ** -2 - (2 * sigma_b) ** -2) ** -0.5)


def rdp_epsilon(q: float, z: float, delta: float) -> Callable[[int], float]:
    """T -> epsilon of T rounds of the Poisson(q)-subsampled Gaussian mechanism with multiplier z
    (RDP, `dp_accounting`'s default orders; the one-round RDP is computed once)."""
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError:
        raise ValueError("accountant: needs the dp-accounting package: pip install 'fedsim-lab[dp]' "
                         "(or accountant: none)") from None
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    acc = rdp.RdpAccountant()
    absl = logging.getLogger("absl")  # orders below 2 that fail to converge are dropped, noisily
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        acc.compose(event)
    finally:
        absl.setLevel(level)
    orders, one = acc.orders, acc.rdp
    return lambda t: float(rdp.compute_epsilon(orders, t * one, delta)[0])


def _sampling(runtime: StrategyRuntime | None) -> tuple[float | None, float | None]:
    """(expected participants m, the clients' common participation rate q), None where unknown."""
    p = None if runtime is None else runtime.probabilities
    if p is None:
        return None, None
    p = np.asarray(p, dtype=np.float64)
    q = float(p[0]) if np.allclose(p, p[0], rtol=0, atol=1e-12) else None
    return float(p.sum()), q


_RATES = ("the participation pattern's rates (build the strategy through the registry, or pass "
          "runtime=StrategyRuntime(...))")


def _check(clip: float | None, z: float, adaptive: bool) -> None:
    if z > 0 and clip is None:
        raise ValueError("noise_multiplier: DP noise needs clipping: set clip (the L2 bound C, or "
                         "the initial C with adaptive: true)")
    if adaptive and clip is None:
        raise ValueError("adaptive: adaptive clipping needs an initial clip")


@STRATEGIES.register("dp-fedavg")
def dp_fedavg(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, server_lr: PositiveFloat = 1.0,
              clip: PositiveFloat | None = 1.0, noise_multiplier: NonNegativeFloat = 0.0,
              adaptive: bool = False, target_quantile: Probability = 0.5, clip_lr: PositiveFloat = 0.2,
              clip_count_stddev: NonNegativeFloat | None = None,
              denominator: Literal["expected", "participants"] = "expected", delta: Fraction = 1e-5,
              accountant: Literal["rdp", "none"] = "rdp",
              runtime: StrategyRuntime | None = None) -> Strategy:
    """DP-FedAvg (McMahan et al., ICLR 2018) with fixed or adaptive clipping (Andrew et al. 2021).

    Clients run FedAvg's local steps and clip Delta_i to norm C; the server averages the clipped
    updates over the expected participant count m, adds Gaussian noise z_D C / m (keyed by
    (seed, DP, round): the same on every engine and rank) and steps x <- x + server_lr Delta; see
    the module docstring for the adaptive clip and the accountant. The metrics line gets
    `dp_epsilon` (None without noise or accountant), `dp_delta` and `dp_clip` (the clip in use).

    Args:
      lr, local_steps: FedAvg's local SGD. server_lr: server step.
      clip: the L2 clip C (adaptive: its initial value; null: no clipping, only without noise).
      noise_multiplier: z, noise std / sensitivity (0: no noise, no privacy).
      adaptive: track the `target_quantile` of the update norms (geometric step `clip_lr`).
      clip_count_stddev: sigma_b, the count noise of the bits (null: 0.05 m, Andrew et al.).
      denominator: "expected" m (the paper's f~_f, what the accountant assumes) or the round's
        actual "participants" |S|.
      delta: the delta of the reported (epsilon, delta).
      accountant: "rdp" (`dp-accounting`) or "none".
      runtime: supplied by the engine (the participation rates).

    Shapes: server {"x": [P]} (+ "clip": [1], broadcast, when adaptive); payload
    {"delta": [m, P]} (+ "unclipped": [m, 1], sent as one bit, when adaptive); no client state.
    """
    _check(clip, noise_multiplier, adaptive)
    m_exp, q = _sampling(runtime)
    if m_exp is None and (denominator == "expected" or (adaptive and clip_count_stddev is None)):
        raise ValueError(f"denominator: 'expected' (and the default clip_count_stddev) need {_RATES}")
    sigma_b = (0.05 * (m_exp or 0.0) if noise_multiplier else 0.0) if clip_count_stddev is None \
        else clip_count_stddev
    try:
        z_d = value_noise(noise_multiplier, sigma_b) if adaptive else noise_multiplier
    except ValueError as exc:
        if clip_count_stddev is not None:
            raise
        raise ValueError(f"{exc} (the default 0.05 m with m = {m_exp:g} expected participants); "
                         "set clip_count_stddev") from None
    epsilon = None
    if noise_multiplier > 0 and accountant == "rdp":
        if q is None:
            raise ValueError("accountant: needs one participation rate for every client (full, uniform, "
                             f"or bernoulli with one p) from {_RATES}, or accountant: none")
        epsilon = rdp_epsilon(q, noise_multiplier, delta)

    def count(ctx: RoundCtx) -> float:
        if denominator == "expected" and m_exp is not None:
            return m_exp
        return float(max(ctx.num_participants, 1))

    def init_server(x0: torch.Tensor) -> Tree:
        server = {"x": x0.clone()}
        if adaptive:
            server["clip"] = torch.full((1,), float(clip or 0.0), dtype=x0.dtype, device=x0.device)
        return server

    def current(server: Tree) -> torch.Tensor | float | None:
        return server["clip"] if adaptive else clip

    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        delta_i, loss = local_delta(server, oracle, ctx, lr, local_steps)
        c = current(server)
        if c is None:
            return {"delta": delta_i}, clients, {"loss": loss}
        rows, bits = clip_rows(delta_i, c)
        if not adaptive:
            return {"delta": rows}, clients, {"loss": loss}
        p = float(delta_i.shape[1])
        info = {"loss": loss, "sent_values": torch.full((ctx.m,), p, dtype=torch.float64, device=rows.device),
                "sent_bits": torch.ones(ctx.m, dtype=torch.float64, device=rows.device)}
        return {"delta": rows, "unclipped": bits}, clients, info

    def weights(server: Tree, ctx: RoundCtx) -> Tree:
        w = torch.full_like(ctx.weight, 1.0 / count(ctx))
        return {"delta": w, "unclipped": torch.ones_like(ctx.weight)}

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        x, m = server["x"], count(ctx)
        step = reduced["delta"] if reduced else torch.zeros_like(x)
        c = current(server)
        if z_d > 0 and c is not None:
            coords = torch.arange(x.shape[0], device=x.device)
            step = step + (z_d * c / m) * rng.normal_torch(ctx.seed, rng.DP, ctx.round, 0, coords,
                                                           device=x.device, dtype=x.dtype)
        out = {**server, "x": x + server_lr * step}
        if adaptive:
            noise = sigma_b * float(rng.normal_torch(ctx.seed, rng.DP, ctx.round, 1, 0))
            bits = float(reduced["unclipped"][0]) if reduced else 0.0
            b = (bits - ctx.num_participants / 2 + noise) / m + 0.5
            out["clip"] = server["clip"] * math.exp(-clip_lr * (b - target_quantile))
        return out

    def metrics(server: Tree, ctx: RoundCtx) -> dict[str, float | None]:
        c = current(server)
        return {"dp_epsilon": None if epsilon is None else epsilon(ctx.round + 1), "dp_delta": delta,
                "dp_clip": None if c is None else float(c if isinstance(c, float) else c[0])}

    def payload(p: int) -> dict[str, tuple[int, ...]]:
        return {"delta": (p,), "unclipped": (1,)} if adaptive else {"delta": (p,)}

    return Strategy(init_server=init_server, init_clients=no_clients, local=local,
                    server_update=server_update, weights=weights, metrics=metrics, payload=payload,
                    broadcast=("x", "clip") if adaptive else ("x",), local_steps=local_steps)
