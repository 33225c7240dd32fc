"""Client-side momentum: FedAvg-M, SCAFFOLD-M and their STORM-style VR variants.

Not to be confused with `fedavgm` (strategies/fedavgm.py, Hsu et al. 2019), which keeps a
momentum buffer on the server. Here the server broadcasts the previous round's global
direction g together with x, and every local step mixes it into the fresh gradient:
    d_k = beta * G_i(y_k) + (1 - beta) * g,   y_{k+1} = y_k - lr * d_k,
with G_i(y) = g_i(y; xi_k) (FedAvg-M) or g_i(y; xi_k) - c_i + c (SCAFFOLD-M). The server
computes the new direction from the reduced update, g+ = (x - sum_S p_i y_i) / (lr K)
(= the weighted mean of the d_k over participants and steps), and steps
x <- x - gamma * g+, with gamma = lr * K * server_lr unless given (then beta = 1 is FedAvg,
resp. SCAFFOLD option II). g starts at 0 (as FedCM's code); a round nobody takes part in
changes nothing.

VR variants (STORM-style) replace beta * G_i(y_k) by G_i(y_k) - (1 - beta) * G_i(x_prev),
where x_prev is the previous global model and both gradients use the SAME minibatch xi_k
(same oracle step), at two gradient evaluations per step.

References:
  Cheng, Huang, Wu, Yuan, "Momentum Benefits Non-IID Federated Learning Simply and
  Provably", ICLR 2024, arXiv:2306.16504 (FedAvg-M, SCAFFOLD-M, and VR variants).
  Xu, Wang, Wang, Xu, Wang, "FedCM: Federated Learning with Client-level Momentum", 2021,
  arXiv:2106.10874 (the same algorithm as FedAvg-M).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from annotated_types import Gt, Le

from fedsim.constraints import PositiveFloat, PositiveInt
from fedsim.types import Oracle, RoundCtx, Strategy, Tree, model_rows, no_clients
from strategies import STRATEGIES
from strategies.fedavg import participant_weights
from strategies.local import broadcast_rows, run_local
from strategies.scaffold import control_weights, zero_controls

Beta = Annotated[float, Gt(0), Le(1)]
Weighting = Literal["samples", "uniform"]


def client_momentum(*, lr: float, local_steps: int, beta: float, server_lr: float,
                    gamma: float | None, weighting: str, corrected: bool, vr: bool) -> Strategy:
    """The shared builder: `corrected` adds SCAFFOLD control variates, `vr` the STORM term.

    Shapes: server {"x", "g"} (+ "c" if corrected, + "x_prev" if vr), all [P] and all
    broadcast; client {"c": [m, P]} if corrected; payload {"delta": [m, P]} (+ "dc").
    With `corrected`, c_i+ = (1/K) sum_k g_i(y_k; xi_k) (the raw gradients used; equals
    SCAFFOLD option II when beta = 1), dc = c_i+ - c_i, and c <- c + (1/N) sum_S dc_i.
    """
    step = gamma if gamma is not None else lr * local_steps * server_lr
    extra = (("c",) if corrected else ()) + (("x_prev",) if vr else ())

    def init_server(x0: torch.Tensor) -> Tree:
        server = {"x": x0.clone(), "g": torch.zeros_like(x0)}
        if corrected:
            server["c"] = torch.zeros_like(x0)
        if vr:
            server["x_prev"] = x0.clone()
        return server

    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        x = broadcast_rows(server["x"], ctx.m)
        shift = server["c"] - clients["c"] if corrected else 0.0
        anchor = (1 - beta) * server["g"]
        x_prev = broadcast_rows(server["x_prev"], ctx.m) if vr else None

        def direction(g: torch.Tensor, k: int) -> torch.Tensor:
            if x_prev is None:
                return beta * (g + shift) + anchor
            g_prev = oracle(x_prev, k)[1]  # same step => same minibatch xi_k, at x_prev
            return (g + shift) - (1 - beta) * (g_prev + shift) + anchor

        run = run_local(x, oracle, local_steps, lr, direction=direction, track_grads=corrected,
                        budget=ctx.steps)
        payload = {"delta": run.y - x}
        if run.grad_sum is None:
            return payload, clients, {"loss": run.loss}
        if ctx.steps is None:  # mean raw gradient: SCAFFOLD-M's c_i+
            c_new = run.grad_sum / local_steps
        else:                  # K_i steps each; a client that took none keeps its c_i
            k_i = ctx.steps.to(x.dtype)[:, None]
            c_new = torch.where(k_i > 0, run.grad_sum / k_i.clamp_min(1), clients["c"])
        return {**payload, "dc": c_new - clients["c"]}, {"c": c_new}, {"loss": run.loss}

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        if not reduced:
            return server
        g = -reduced["delta"] / (lr * local_steps)
        new = {**server, "x": server["x"] - step * g, "g": g}
        if corrected:
            new["c"] = server["c"] + reduced["dc"]
        if vr:
            new["x_prev"] = server["x"]
        return new

    def weights(server: Tree, ctx: RoundCtx) -> torch.Tensor | Tree:
        return control_weights(weighting, ctx) if corrected else participant_weights(weighting, ctx)

    return Strategy(init_server=init_server, init_clients=zero_controls if corrected else no_clients,
                    local=local, server_update=server_update, weights=weights,
                    broadcast=("x", "g") + extra,
                    payload=model_rows("delta", "dc") if corrected else model_rows("delta"),
                    local_steps=local_steps)


@STRATEGIES.register("fedavg-m")
def fedavg_m(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, beta: Beta = 0.5,
             server_lr: PositiveFloat = 1.0, gamma: PositiveFloat | None = None,
             weighting: Weighting = "samples") -> Strategy:
    """FedAvg-M = FedCM (Cheng et al. ICLR'24, arXiv:2306.16504): CLIENT-side momentum.

    Local steps d_k = beta g_i(y_k; xi_k) + (1 - beta) g; server g+ = (x - sum p_i y_i)/(lr K),
    x+ = x - gamma g+ (module docstring). Fixed point of FedAvg-M(lr, beta) = fixed point of
    FedAvg(lr * beta), so smaller beta removes more client drift. Not server momentum
    (that is `fedavgm`).

    Args:
      lr: local step size eta.
      local_steps: local steps K.
      beta: weight of the fresh gradient in (0, 1]; 1 - beta goes to the server direction g.
      server_lr: gamma / (lr K); 1 makes x+ the weighted mean of the local models.
      gamma: global step on g (overrides server_lr when given).
      weighting: p_i = n_i / sum_S n_j ("samples") or 1/|S| ("uniform").
    """
    return client_momentum(lr=lr, local_steps=local_steps, beta=beta, server_lr=server_lr,
                           gamma=gamma, weighting=weighting, corrected=False, vr=False)


@STRATEGIES.register("scaffold-m")
def scaffold_m(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, beta: Beta = 0.5,
               server_lr: PositiveFloat = 1.0, gamma: PositiveFloat | None = None,
               weighting: Weighting = "uniform") -> Strategy:
    """SCAFFOLD-M (Cheng et al. ICLR'24, arXiv:2306.16504): SCAFFOLD + client-side momentum.

    d_k = beta (g_i(y_k; xi_k) - c_i + c) + (1 - beta) g; c_i+ = mean_k g_i(y_k; xi_k);
    c <- c + (1/N) sum_S (c_i+ - c_i). beta = 1 is SCAFFOLD option II with server step
    gamma / (lr K). Reconstruction: the placement of the momentum on the corrected gradient
    is unverified against the paper's Algorithm 2. Arguments as for `fedavg-m`.
    """
    return client_momentum(lr=lr, local_steps=local_steps, beta=beta, server_lr=server_lr,
                           gamma=gamma, weighting=weighting, corrected=True, vr=False)


@STRATEGIES.register("fedavg-m-vr")
def fedavg_m_vr(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, beta: Beta = 0.5,
                server_lr: PositiveFloat = 1.0, gamma: PositiveFloat | None = None,
                weighting: Weighting = "samples") -> Strategy:
    """FedAvg-M-VR (Cheng et al. ICLR'24, arXiv:2306.16504): STORM-style FedAvg-M.

    d_k = g_i(y_k; xi_k) - (1 - beta) g_i(x_prev; xi_k) + (1 - beta) g, same minibatch at
    the previous global model x_prev (two gradients per step). Reconstruction, unverified
    against the paper's Algorithms 3/4. Note: with exact gradients its fixed point is
    FedAvg(lr)'s (0.6041 on the drift quadratic), not FedAvg(lr * beta)'s. Arguments as for
    `fedavg-m`.
    """
    return client_momentum(lr=lr, local_steps=local_steps, beta=beta, server_lr=server_lr,
                           gamma=gamma, weighting=weighting, corrected=False, vr=True)


@STRATEGIES.register("scaffold-m-vr")
def scaffold_m_vr(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, beta: Beta = 0.5,
                  server_lr: PositiveFloat = 1.0, gamma: PositiveFloat | None = None,
                  weighting: Weighting = "uniform") -> Strategy:
    """SCAFFOLD-M-VR (Cheng et al. ICLR'24, arXiv:2306.16504): STORM-style SCAFFOLD-M.

    d_k = G_i(y_k) - (1 - beta) G_i(x_prev) + (1 - beta) g with G_i(y) = g_i(y; xi_k) - c_i + c,
    same minibatch xi_k at both points; c_i+ = mean_k g_i(y_k; xi_k). Reconstruction,
    unverified against the paper's Algorithms 3/4. Arguments as for `fedavg-m`.
    """
    return client_momentum(lr=lr, local_steps=local_steps, beta=beta, server_lr=server_lr,
                           gamma=gamma, weighting=weighting, corrected=True, vr=True)
