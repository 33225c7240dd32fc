"""FedDyn: federated learning with a dynamic regulariser, which aligns every client's stationary
point with the global one.

References:
  Acar, Zhao, Matas, Mattina, Whatmough, Saligrama, "Federated Learning Based on Dynamic
  Regularization", ICLR 2021, arXiv:2111.04263 (Algorithm 1; reference code alpemreacar/FedDyn).
"""

from __future__ import annotations

from typing import Literal

import torch

from fedsim.constraints import PositiveFloat, PositiveInt
from fedsim.types import Oracle, RoundCtx, Strategy, Tree, model_rows
from strategies import STRATEGIES
from strategies.fedavg import participant_weights
from strategies.fedprox import ProximalOracle
from strategies.local import broadcast_rows, local_sgd


def zero_gradients(x0: torch.Tensor, ids: torch.Tensor) -> Tree:
    """Client state grad L_i(theta_i^0) = 0: {"g": [m, P]}."""
    return {"g": torch.zeros((ids.shape[0], x0.shape[-1]), dtype=x0.dtype, device=x0.device)}


def covered(weighting: str, ctx: RoundCtx) -> float:
    """The participants' share of all clients: |S| / N ("uniform") or sum_S n_j / n ("samples")."""
    if weighting == "uniform":
        return ctx.num_participants / ctx.num_clients
    n = ctx.total_samples.double()
    return float((n * ctx.participants.double()).sum() / n.sum())


@STRATEGIES.register("feddyn")
def feddyn(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, alpha: PositiveFloat = 0.1,
           weighting: Literal["uniform", "samples"] = "uniform") -> Strategy:
    """FedDyn (Acar et al., ICLR 2021): local objective with the client's dynamic regulariser.

    Participant i starts from the server model x = theta^{t-1} and takes K (or ctx.steps) SGD
    steps on
        L_i(y) - <g_i, y> + alpha/2 ||y - x||^2,   gradient  grad L_i(y) - g_i + alpha (y - x),
    where g_i = grad L_i(theta_i^{t-1}) is its state (0 at first), then updates
        g_i <- g_i - alpha (y_i - x)
    and sends Delta_i = y_i - x. With p_i = 1/|S| (the paper) the server keeps h (0 at first):
        h <- h - alpha (1/N) sum_S Delta_i = h - alpha (|S|/N) sum_S p_i Delta_i
        x <- (1/|S|) sum_S y_i - h / alpha = x + sum_S p_i Delta_i - h / alpha.
    "samples" uses p_i = n_i / sum_S n_j and n_i / n in place of 1/N. Under full participation
    h = (1/N) sum_i g_i, and a fixed point has y_i = x and h = 0, hence sum_i grad L_i(x) = 0:
    FedDyn converges to the true optimum on heterogeneous clients even with inexact local
    solves (tests/test_conformance.py; FedAvg stops elsewhere). Absent clients keep g_i.

    Args:
      lr: local step size. local_steps: local SGD steps K.
      alpha: regularisation strength (paper: 0.1, 0.01, 0.001).
      weighting: "uniform" (the paper) or "samples".

    Shapes: server {"x": [P], "h": [P]} (only x is broadcast); client {"g": [m, P]};
    payload {"delta": [m, P]}.
    """
    def init_server(x0: torch.Tensor) -> Tree:
        return {"x": x0.clone(), "h": torch.zeros_like(x0)}

    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        x = broadcast_rows(server["x"], ctx.m)
        g_i = clients["g"]
        y, loss = local_sgd(x, ProximalOracle(oracle, x, alpha), local_steps, lr,
                            direction=lambda g, k: g - g_i, budget=ctx.steps)
        delta = y - x
        return {"delta": delta}, {"g": g_i - alpha * delta}, {"loss": loss}

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        if not reduced:
            return server
        h = server["h"] - alpha * covered(weighting, ctx) * reduced["delta"]
        return {**server, "x": server["x"] + reduced["delta"] - h / alpha, "h": h}

    return Strategy(init_server=init_server, init_clients=zero_gradients, local=local,
                    server_update=server_update,
                    weights=lambda server, ctx: participant_weights(weighting, ctx),
                    payload=model_rows("delta"), local_steps=local_steps)
