"""Client-side momentum: FedAvg-M, SCAFFOLD-M and their STORM-style VR variants.

Not to be confused with `fedavgm` (strategies/fedavgm.py, Hsu et al. 2019), which keeps a
momentum buffer on the server. Here the server broadcasts the previous round's global
direction g together with x, and every local step mixes it into the fresh gradient:
    d_k = beta * G_i(y_k) + (1 - beta) * g,   y_{k+1} = y_k - lr * d_k,
with G_i(y) = g_i(y; xi_k) (FedAvg-M) or g_i(y; xi_k) - c_i + c (SCAFFOLD-M). The server
computes the new direction from the reduced update, g+ = (x - sum_S p_i y_i) / (lr K)
(= the weighted mean of the d_k over participants and steps), and steps x <- x - gamma * g+
with gamma = lr * K * server_lr (server_lr = 1 makes x+ the mean of the local models, and
beta = 1 is then FedAvg, resp. SCAFFOLD option II). A round nobody takes part in changes
nothing. g starts at 0 (`g0: zero`, as FedCM's code) or at the participants' mean full local
gradient at x0 (`g0: grad`, which spends round 0 on it: x stays x0).

VR variants (STORM-style) replace beta * G_i(y_k) by G_i(y_k) - (1 - beta) * G_i(z_k), both
gradients on the SAME minibatch xi_k (same oracle step), at two gradient evaluations per step.
z_k is the previous global model x^{r-1} (`correction: prev_global`, the most plausible reading
of the paper's Algorithms 3/4, which could not be retrieved) or the client's own iterate at
step k of its previous participation (`correction: prev_trajectory`, not from the paper: exact
STORM along the local trajectories). docs/algorithms.md#vr-variants has their fixed points.

References:
  Cheng, Huang, Wu, Yuan, "Momentum Benefits Non-IID Federated Learning Simply and
  Provably", ICLR 2024, arXiv:2306.16504 (FedAvg-M, SCAFFOLD-M, and VR variants).
  Xu, Wang, Wang, Xu, Wang, "FedCM: Federated Learning with Client-level Momentum", 2021,
  arXiv:2106.10874 (the same algorithm as FedAvg-M).
  Cutkosky, Orabona, "Momentum-Based Variance Reduction in Non-Convex SGD", NeurIPS 2019,
  arXiv:1905.10018 (STORM).
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
from strategies.scaffold import control_weights

Beta = Annotated[float, Gt(0), Le(1)]
Weighting = Literal["samples", "uniform"]
Correction = Literal["prev_global", "prev_trajectory"]
G0 = Literal["zero", "grad"]


class _Recording:
    """An oracle that records the points its gradients are taken at (the local trajectory)."""

    def __init__(self, oracle: Oracle) -> None:
        self.oracle, self.points = oracle, list[torch.Tensor]()

    def __call__(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.points.append(x)
        return self.oracle(x, step)

    def full(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.oracle.full(x)


def _mean_gradient(grad_sum: torch.Tensor, local_steps: int, c: torch.Tensor,
                   ctx: RoundCtx) -> torch.Tensor:
    """(1/K_i) sum_k g_i(y_k; xi_k) [m, P]: K_i = local_steps, or the row's budget under a `work:`
    section (a client that took no step keeps its c_i)."""
    if ctx.steps is None:
        return grad_sum / local_steps
    k_i = ctx.steps.to(grad_sum.dtype)[:, None]
    return torch.where(k_i > 0, grad_sum / k_i.clamp_min(1), c)


def _trajectory(seen: _Recording, y: torch.Tensor, clients: Tree, ctx: RoundCtx) -> torch.Tensor:
    """The points [m, K, P] of this round's first K gradient calls, K = the stored trajectory's
    length; under a `work:` budget a shorter run is padded with its final point, steps beyond K
    are not stored (later steps reuse the last point) and a client that took no step keeps its
    old trajectory."""
    old = clients["traj"]
    k = old.shape[1]
    points = (seen.points + [y] * k)[:k]
    out = torch.stack(points, dim=1)
    if ctx.steps is None:
        return out
    return torch.where((ctx.steps > 0).view(-1, 1, 1), out, old)


def client_momentum(*, lr: float, local_steps: int, beta: float, server_lr: float, weighting: str,
                    corrected: bool, vr: Correction | None, g0: str = "zero") -> Strategy:
    """The shared builder: `corrected` adds SCAFFOLD control variates, `vr` the STORM term.

    Shapes: server {"x", "g"} (+ "c" if corrected, + "x_prev" for prev_global), all [P] and
    all broadcast; client {"c": [m, P]} if corrected, {"traj": [m, K, P]} for prev_trajectory;
    payload {"delta": [m, P]} (+ "dc"). With `corrected`, c_i+ = (1/K) sum_k g_i(y_k; xi_k)
    (the raw gradients used; SCAFFOLD option II when beta = 1), dc = c_i+ - c_i, and
    c <- c + (1/N) sum_S dc_i.
    """
    scale = lr * local_steps
    step = scale * server_lr
    traj = vr == "prev_trajectory"
    extra = (("c",) if corrected else ()) + (("x_prev",) if vr == "prev_global" else ())

    def init_server(x0: torch.Tensor) -> Tree:
        server = {"x": x0.clone(), "g": torch.zeros_like(x0)}
        if corrected:
            server["c"] = torch.zeros_like(x0)
        if vr == "prev_global":
            server["x_prev"] = x0.clone()
        return server

    def init_clients(x0: torch.Tensor, ids: torch.Tensor) -> Tree:
        rows = broadcast_rows(x0, ids.numel())
        state = {"c": torch.zeros_like(rows)} if corrected else {}
        if traj:
            state["traj"] = rows[:, None, :].expand(-1, local_steps, -1).clone()  # x^{-1} := x0
        return state

    def initial_direction(x: torch.Tensor, clients: Tree, oracle: Oracle) -> tuple[Tree, Tree, Tree]:
        """g0: grad, round 0: send -lr K grad f_i(x0), so that the server's g+ is its mean."""
        loss, grad = oracle.full(x)
        payload = {"delta": -scale * grad}
        return ({**payload, "dc": torch.zeros_like(grad)} if corrected else payload), clients, {"loss": loss}

    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        x = broadcast_rows(server["x"], ctx.m)
        if g0 == "grad" and ctx.round == 0:
            return initial_direction(x, clients, oracle)
        shift = server["c"] - clients["c"] if corrected else 0.0
        anchor = (1 - beta) * server["g"]
        x_prev = broadcast_rows(server["x_prev"], ctx.m) if vr == "prev_global" else None
        seen = _Recording(oracle) if traj else oracle

        def direction(g: torch.Tensor, k: int) -> torch.Tensor:
            if vr is None:
                return beta * (g + shift) + anchor
            z = x_prev if x_prev is not None else clients["traj"][:, min(k, local_steps - 1)]
            g_prev = oracle(z, k)[1]  # same step => same minibatch xi_k, at the previous point
            return (g + shift) - (1 - beta) * (g_prev + shift) + anchor

        run = run_local(x, seen, local_steps, lr, direction=direction, track_grads=corrected,
                        budget=ctx.steps)
        payload = {"delta": run.y - x}
        new = {"traj": _trajectory(seen, run.y, clients, ctx)} if isinstance(seen, _Recording) else {}
        if run.grad_sum is not None:
            c_new = _mean_gradient(run.grad_sum, local_steps, clients["c"], ctx)  # SCAFFOLD-M's c_i+
            payload["dc"] = c_new - clients["c"]
            new["c"] = c_new
        return payload, {**clients, **new}, {"loss": run.loss}

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        if not reduced:
            return server
        g = -reduced["delta"] / scale
        if g0 == "grad" and ctx.round == 0:
            return {**server, "g": g}
        new = {**server, "x": server["x"] - step * g, "g": g}
        if corrected:
            new["c"] = server["c"] + reduced["dc"]
        if vr == "prev_global":
            new["x_prev"] = server["x"]
        return new

    def weights(server: Tree, ctx: RoundCtx) -> torch.Tensor | Tree:
        return control_weights(weighting, ctx) if corrected else participant_weights(weighting, ctx)

    return Strategy(init_server=init_server,
                    init_clients=init_clients if corrected or traj else no_clients,
                    local=local, server_update=server_update, weights=weights,
                    broadcast=("x", "g") + extra,
                    payload=model_rows("delta", "dc") if corrected else model_rows("delta"),
                    local_steps=local_steps)


@STRATEGIES.register("fedavg-m")
def fedavg_m(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, beta: Beta = 0.5,
             server_lr: PositiveFloat = 1.0, weighting: Weighting = "uniform",
             g0: G0 = "zero") -> Strategy:
    """FedAvg-M = FedCM (Cheng et al. ICLR'24, arXiv:2306.16504): CLIENT-side momentum.

    Local steps d_k = beta g_i(y_k; xi_k) + (1 - beta) g; server g+ = (x - sum p_i y_i)/(lr K),
    x+ = x - gamma g+ (module docstring). Fixed point of FedAvg-M(lr, beta) = fixed point of
    FedAvg(lr * beta), so smaller beta removes more client drift. Not server momentum
    (that is `fedavgm`). The paper's setting is full participation; any pattern runs.

    Args:
      lr: local step size eta.
      local_steps: local steps K.
      beta: weight of the fresh gradient in (0, 1]; 1 - beta goes to the server direction g.
      server_lr: the global step is gamma = lr K server_lr (1: x+ is the mean of the local
        models; the paper's gamma is this product, so there is no separate gamma key).
      weighting: p_i = 1/|S| ("uniform", the paper's 1/(N K) average) or n_i / sum_S n_j
        ("samples").
      g0: the initial direction: "zero" (FedCM's code) or "grad" (the participants' mean full
        local gradient at x0, computed in round 0, which leaves x at x0). The paper takes g0 as
        an input whose value could not be checked.
    """
    return client_momentum(lr=lr, local_steps=local_steps, beta=beta, server_lr=server_lr,
                           weighting=weighting, corrected=False, vr=None, g0=g0)


@STRATEGIES.register("scaffold-m")
def scaffold_m(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, beta: Beta = 0.5,
               server_lr: PositiveFloat = 1.0, weighting: Weighting = "uniform",
               g0: G0 = "zero") -> Strategy:
    """SCAFFOLD-M (Cheng et al. ICLR'24, arXiv:2306.16504): SCAFFOLD + client-side momentum.

    d_k = beta (g_i(y_k; xi_k) - c_i + c) + (1 - beta) g; c_i+ = mean_k g_i(y_k; xi_k);
    c <- c + (1/N) sum_S (c_i+ - c_i). beta = 1 is SCAFFOLD option II with the same server_lr.
    Reconstruction: the placement of the momentum on the corrected gradient is unverified
    against the paper's Algorithm 2. Arguments as for `fedavg-m`.
    """
    return client_momentum(lr=lr, local_steps=local_steps, beta=beta, server_lr=server_lr,
                           weighting=weighting, corrected=True, vr=None, g0=g0)


@STRATEGIES.register("fedavg-m-vr")
def fedavg_m_vr(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, beta: Beta = 0.5,
                server_lr: PositiveFloat = 1.0, weighting: Weighting = "uniform", g0: G0 = "zero",
                correction: Correction = "prev_global") -> Strategy:
    """FedAvg-M-VR: a RECONSTRUCTION of Cheng et al. Alg. 3 (arXiv:2306.16504; text not retrievable).

    d_k = g_i(y_k; xi_k) - (1 - beta) g_i(z_k; xi_k) + (1 - beta) g, the same minibatch at the
    previous point z_k (two gradients per step). With `prev_global` and exact gradients the
    fixed point is FedAvg(lr)'s (0.6041 on the drift quadratic) for every beta, not
    FedAvg(lr * beta)'s, and STORM needs gamma L << sqrt(beta): do not expect it to beat FedAvg
    at FedAvg's lr; sweep lr down (docs/algorithms.md#vr-variants).

    Args:
      correction: where the second gradient is taken: "prev_global" (x^{r-1}, the previous
        global model: the recalled form of the paper) or "prev_trajectory" (the client's own
        iterate at step k of its previous participation: exact STORM along the local
        trajectories, NOT from the paper; fixed point FedAvg(lr beta)'s, as FedAvg-M's; client
        state K P values; x^{-1} := x0 for both).
      Other arguments as for `fedavg-m`.
    """
    return client_momentum(lr=lr, local_steps=local_steps, beta=beta, server_lr=server_lr,
                           weighting=weighting, corrected=False, vr=correction, g0=g0)


@STRATEGIES.register("scaffold-m-vr")
def scaffold_m_vr(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, beta: Beta = 0.5,
                  server_lr: PositiveFloat = 1.0, weighting: Weighting = "uniform", g0: G0 = "zero",
                  correction: Correction = "prev_global") -> Strategy:
    """SCAFFOLD-M-VR: a RECONSTRUCTION of Cheng et al. Alg. 4 (arXiv:2306.16504; text not retrievable).

    d_k = G_i(y_k) - (1 - beta) G_i(z_k) + (1 - beta) g with G_i(y) = g_i(y; xi_k) - c_i + c,
    the same minibatch xi_k at both points; c_i+ = mean_k g_i(y_k; xi_k). Its exact-gradient
    fixed point is x* for either `correction`. Arguments as for `fedavg-m-vr`.
    """
    return client_momentum(lr=lr, local_steps=local_steps, beta=beta, server_lr=server_lr,
                           weighting=weighting, corrected=True, vr=correction, g0=g0)
