"""FedAvgM: FedAvg with heavy-ball momentum on the SERVER (not client-side momentum).

Not to be confused with `fedavg-m` (strategies/momentum.py), the client-side momentum of
Cheng et al. 2024 (= FedCM): here clients run plain local SGD and only the server keeps a
momentum buffer over the averaged pseudo-gradients.

References:
  Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
  Visual Classification", 2019, arXiv:1909.06335 (FedAvgM).
"""

from __future__ import annotations

from typing import Literal

import torch

from fedsim.constraints import Momentum, PositiveFloat, PositiveInt
from fedsim.types import RoundCtx, Strategy, Tree, no_clients
from strategies import STRATEGIES
from strategies.fedavg import participant_weights
from strategies.local import delta_local


@STRATEGIES.register("fedavgm")
def fedavgm(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, server_lr: PositiveFloat = 1.0,
            beta: Momentum = 0.9, weighting: Literal["samples", "uniform"] = "samples") -> Strategy:
    """FedAvgM (Hsu, Qi, Brown 2019, arXiv:1909.06335): server-side heavy-ball momentum.

    Clients run `local_steps` SGD steps from x and send Delta_i = y_i - x (as FedAvg). The
    server forms the pseudo-gradient Delta_bar = x - sum_i p_i y_i = -sum_i p_i Delta_i and
    applies
        v <- beta * v + Delta_bar        (v_0 = 0)
        x <- x - server_lr * v
    The effective step is about server_lr / (1 - beta); tune the two jointly. beta = 0 is
    FedAvg with server step server_lr. A round nobody takes part in changes nothing
    (v is not decayed).

    Args:
      lr: local step size eta_l.
      local_steps: local SGD steps K per round.
      server_lr: server step size eta_g.
      beta: server momentum in [0, 1) (0.9 is the paper's typical value).
      weighting: p_i = n_i / sum_S n_j ("samples") or 1/|S| ("uniform").

    Shapes: server {"x": [P], "v": [P]}; payload {"delta": [m, P]}; no client state.
    """
    def init_server(x0: torch.Tensor) -> Tree:
        return {"x": x0.clone(), "v": torch.zeros_like(x0)}

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        if not reduced:
            return server
        v = beta * server["v"] + (-reduced["delta"])
        return {**server, "x": server["x"] - server_lr * v, "v": v}

    return Strategy(init_server=init_server, init_clients=no_clients,
                    local=delta_local(lr, local_steps),
                    server_update=server_update,
                    weights=lambda server, ctx: participant_weights(weighting, ctx), local_steps=local_steps)
