"""FedProx: FedAvg whose local steps minimise f_i plus a proximal term around the server model.

References:
  Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
  Networks", MLSys 2020, arXiv:1812.06127 (Algorithm 2; reference code litian96/FedProx).
"""

from __future__ import annotations

from typing import Literal

import torch

from fedsim.constraints import NonNegativeFloat, PositiveFloat, PositiveInt
from fedsim.types import Oracle, RoundCtx, Strategy, Tree
from strategies import STRATEGIES
from strategies.fedavg import fedavg
from strategies.local import broadcast_rows, local_sgd


class ProximalOracle:
    """Gradients of the FedProx local objective h_i(y) = f_i(y) + mu/2 ||y - x||^2.

    Wraps a block's oracle: ``(loss [m], g [m, P] + mu (y - x))``; the loss stays f_i's (the
    training loss of the metrics). `strategies.local.run_local`'s `direction` sees only the
    gradient, not the iterate, so the proximal gradient enters here.
    """

    def __init__(self, oracle: Oracle, x: torch.Tensor, mu: float) -> None:
        self.oracle, self.anchor, self.mu = oracle, x, mu

    def __call__(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the local iterate y [m, P]."""
        loss, g = self.oracle(x, step)
        return loss, g + self.mu * (x - self.anchor)

    def full(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, g = self.oracle.full(x)
        return loss, g + self.mu * (x - self.anchor)


def proximal_local(server: Tree, oracle: Oracle, ctx: RoundCtx, lr: float, steps: int,
                   mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """K (or ctx.steps) SGD steps on h_i from the server model: (Delta = y - x [m, P], loss [m]).

    mu = 0 runs FedAvg's loop unchanged (bitwise)."""
    x = broadcast_rows(server["x"], ctx.m)
    inner = oracle if mu == 0 else ProximalOracle(oracle, x, mu)
    y, loss = local_sgd(x, inner, steps, lr, budget=ctx.steps)
    return y - x, loss


@STRATEGIES.register("fedprox")
def fedprox(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, mu: NonNegativeFloat = 0.01,
            server_lr: PositiveFloat = 1.0,
            weighting: Literal["samples", "uniform"] = "samples") -> Strategy:
    """FedProx (Li et al., MLSys 2020): local steps on f_i(y) + mu/2 ||y - x||^2.

    Each participant i starts from the server model x and runs `local_steps` (or its budget
    K_i of a `work:` section: FedProx's "variable amounts of work") SGD steps
        y <- y - lr (g_i(y; xi_k) + mu (y - x)),
    then sends Delta_i = y_i - x; the server applies x <- x + server_lr sum_S p_i Delta_i
    (p_i = n_i / sum_S n_j or 1/|S|). mu = 0 is FedAvg bit for bit. On f_i = 1/2 h (y - c)^2
    (per coordinate) K exact steps give Delta_i = (1 - q_i) h_i (c_i - x) / (h_i + mu) with
    q_i = (1 - lr (h_i + mu))^K, so FedProx stops at
        x = sum_i p_i b_i c_i / sum_i p_i b_i,   b_i = (1 - q_i) h_i / (h_i + mu)
    (FedAvg's fixed point at mu = 0; tests/test_conformance.py).

    Args:
      lr: local step size eta_l.
      local_steps: local SGD steps K per round.
      mu: proximal coefficient (>= 0; the paper tunes it in {0.001, 0.01, 0.1, 1}).
      server_lr: server step size eta_g.
      weighting: "samples" (p_i proportional to n_i) or "uniform".

    Shapes: server {"x": [P]}; payload {"delta": [m, P]}; no client state.
    """
    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        delta, loss = proximal_local(server, oracle, ctx, lr, local_steps, mu)
        return {"delta": delta}, clients, {"loss": loss}

    base = fedavg(lr=lr, local_steps=local_steps, server_lr=server_lr, weighting=weighting)
    return base._replace(local=local)
