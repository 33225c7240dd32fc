"""FedAvg: local SGD on the sampled clients, weighted average of their updates.

References:
  McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep
  Networks from Decentralized Data", AISTATS 2017, arXiv:1602.05629 (Algorithm 1).
  The server learning rate (pseudo-gradient form) follows Reddi et al., "Adaptive Federated
  Optimization", ICLR 2021, arXiv:2003.00295.
"""

from __future__ import annotations

from typing import Literal

import torch

from fedsim.constraints import PositiveFloat, PositiveInt
from fedsim.types import RoundCtx, Strategy, Tree, no_clients
from strategies import STRATEGIES
from strategies.local import delta_local


def participant_weights(weighting: str, ctx: RoundCtx) -> torch.Tensor:
    """[m] weights over this round's participants: n_i / sum_S n_j, or 1 / |S|."""
    if weighting == "uniform":
        return torch.full_like(ctx.weight, 1.0 / max(ctx.num_participants, 1))
    return ctx.weight


@STRATEGIES.register("fedavg")
def fedavg(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, server_lr: PositiveFloat = 1.0,
           weighting: Literal["samples", "uniform"] = "samples") -> Strategy:
    """FedAvg (McMahan et al. 2017): K local SGD steps, weighted mean of the updates.

    Each participant i starts from the server model x, runs `local_steps` minibatch SGD steps
    with step `lr`, and sends Delta_i = y_i - x. The server applies
    x <- x + server_lr * sum_{i in S} p_i Delta_i with p_i = n_i / sum_{j in S} n_j
    ("samples") or 1/|S| ("uniform"). server_lr = 1 is the original algorithm (x = sum p_i y_i).

    Args:
      lr: local step size eta_l.
      local_steps: local SGD steps K per round.
      server_lr: server step size eta_g applied to the averaged update.
      weighting: "samples" (p_i proportional to local dataset size) or "uniform".

    Shapes: server {"x": [P]}; payload {"delta": [m, P]}; no client state.
    """
    def init_server(x0: torch.Tensor) -> Tree:
        return {"x": x0.clone()}

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        if not reduced:
            return server
        return {**server, "x": server["x"] + server_lr * reduced["delta"]}

    return Strategy(init_server=init_server, init_clients=no_clients,
                    local=delta_local(lr, local_steps),
                    server_update=server_update,
                    weights=lambda server, ctx: participant_weights(weighting, ctx), local_steps=local_steps)
