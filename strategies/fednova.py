"""FedNova: normalised averaging, which removes FedAvg's objective inconsistency when clients run
different numbers of local steps.

References:
  Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in Heterogeneous
  Federated Optimization", NeurIPS 2020, arXiv:2007.07481 (Section 4, eqs. (6)-(7); reference
  code JYWa/FedNova). Local budgets tau_i come from the scenario's `work:` section
  (`fedsim.work`, `ctx.steps`); without one every client runs `local_steps`.

Why: client i's update after tau_i local SGD steps is Delta_i = -lr G_i a_i, a weighted sum of
its gradients with weights a_i (all ones for SGD). FedAvg's x + sum p_i Delta_i weights client i
by p_i ||a_i||_1, so it converges to a stationary point of the surrogate sum_i p_i ||a_i||_1 f_i.
FedNova averages the normalised updates d_i = Delta_i / ||a_i||_1 and rescales by
tau_eff = sum_i p_i ||a_i||_1, which keeps the step size and targets sum_i p_i f_i.
"""

from __future__ import annotations

from typing import Literal

import torch

from fedsim.constraints import Momentum, PositiveFloat, PositiveInt
from fedsim.types import Oracle, RoundCtx, Strategy, Tree, no_clients
from strategies import STRATEGIES
from strategies.fedavg import participant_weights
from strategies.local import broadcast_rows, momentum, run_local


def normalizer(tau: torch.Tensor, rho: float) -> torch.Tensor:
    """||a_i||_1 [m] after tau_i [m] local steps of heavy ball with mass rho (rho = 0: SGD).

    With b <- rho b + g, y <- y - lr b (torch.optim.SGD, dampening 0) the gradient of step j
    enters the update with weight (1 - rho^(tau - j)) / (1 - rho), so
    ||a_i||_1 = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)   (= tau_i for rho = 0).
    """
    t = tau.double()
    if rho == 0:
        return t
    return (t - rho * (1 - rho ** t) / (1 - rho)) / (1 - rho)


def _payload(p: int) -> dict[str, tuple[int, ...]]:
    return {"delta": (p,), "a": (1,)}


@STRATEGIES.register("fednova")
def fednova(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, server_lr: PositiveFloat = 1.0,
            rho: Momentum = 0.0, weighting: Literal["samples", "uniform"] = "samples") -> Strategy:
    """FedNova (Wang et al., NeurIPS 2020): average normalised updates, rescale by tau_eff.

    Each participant i runs its tau_i local steps (`ctx.steps`, else `local_steps`) of SGD, or of
    heavy ball with mass `rho` (fresh buffer every round), from x, and sends
        d_i = (y_i - x) / a_i   and   a_i = ||a_i||_1   (`normalizer`: tau_i for SGD).
    The server applies
        x <- x + server_lr tau_eff sum_S p_i d_i,   tau_eff = sum_S p_i a_i
    with p_i = n_i / sum_S n_j ("samples") or 1/|S|. With equal tau_i = tau this is FedAvg
    (d_i = Delta_i / tau, tau_eff = tau). A client with tau_i = 0 sends d_i = 0, a_i = 0.

    Fixed points on f_i = 1/2 h_i (y - c_i)^2 with exact gradients (per coordinate), with
    q_i = (1 - lr h_i)^tau_i (tests/strategies/test_fednova.py):
        FedAvg   x = sum p_i (1 - q_i) c_i / sum p_i (1 - q_i)        -> the optimum of
                 sum_i p_i tau_i f_i as lr -> 0 (objective inconsistency)
        FedNova  x = sum p_i (1 - q_i)/tau_i c_i / sum p_i (1 - q_i)/tau_i  -> x* as lr -> 0.

    Args:
      lr: local step size eta_l.
      local_steps: tau when the scenario sets no heterogeneous work.
      server_lr: server step eta_g (1: the paper).
      rho: local momentum (0: SGD, the paper's FedNova; > 0: its momentum variant).
      weighting: "samples" (p_i proportional to n_i, the paper) or "uniform".

    Shapes: server {"x": [P]}; payload {"delta": [m, P], "a": [m, 1]}; no client state.
    """
    opt = momentum(mass=rho) if rho else None

    def init_server(x0: torch.Tensor) -> Tree:
        return {"x": x0.clone()}

    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        x = broadcast_rows(server["x"], ctx.m)
        run = run_local(x, oracle, local_steps, lr, opt=opt, budget=ctx.steps)
        tau = ctx.steps if ctx.steps is not None else torch.full((ctx.m,), local_steps, device=x.device)
        a = normalizer(tau, rho).to(x.dtype)[:, None]
        return {"delta": (run.y - x) / a.clamp_min(1e-30), "a": a}, clients, {"loss": run.loss}

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        if not reduced:
            return server
        tau_eff = reduced["a"][0]
        return {**server, "x": server["x"] + server_lr * tau_eff * reduced["delta"]}

    return Strategy(init_server=init_server, init_clients=no_clients, local=local,
                    server_update=server_update,
                    weights=lambda server, ctx: participant_weights(weighting, ctx), payload=_payload,
                    local_steps=local_steps)
