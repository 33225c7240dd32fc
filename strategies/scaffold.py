"""SCAFFOLD: local steps corrected by control variates, which removes client drift.

References:
  Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging
  for Federated Learning", ICML 2020, arXiv:1910.06378 (Algorithm 1, options I and II).

The helpers `zero_controls` and `control_weights` are shared with SCAFFOLD-M
(strategies/momentum.py).
"""

from __future__ import annotations

from typing import Literal

import torch

from fedsim.constraints import PositiveFloat, PositiveInt
from fedsim.types import Oracle, RoundCtx, Strategy, Tree, model_rows
from strategies import STRATEGIES
from strategies.fedavg import participant_weights
from strategies.local import broadcast_rows, local_sgd


def zero_controls(x0: torch.Tensor, ids: torch.Tensor) -> Tree:
    """Client control variates c_i = 0: {"c": [m, P]} (x0 is [P] or [m, P])."""
    return {"c": torch.zeros((ids.shape[0], x0.shape[-1]), dtype=x0.dtype, device=x0.device)}


def control_weights(weighting: str, ctx: RoundCtx) -> Tree:
    """Weights of the payload segments: "delta" over participants, "dc" over ALL N clients.

    "uniform": delta 1/|S| and dc 1/N, so c <- c + (1/N) sum_S Delta c_i (the paper).
    "samples": delta n_i / sum_S n_j and dc n_i / sum_all n_j, which keeps
    c == sum_i (n_i / n) c_i and targets the sample-weighted objective sum_i (n_i / n) f_i.
    """
    if weighting == "uniform":
        dc = torch.full_like(ctx.weight, 1.0 / ctx.num_clients)
    else:
        dc = ctx.num_samples.to(ctx.weight.dtype) / ctx.total_samples.sum().to(ctx.weight.dtype)
    return {"delta": participant_weights(weighting, ctx), "dc": dc}


@STRATEGIES.register("scaffold")
def scaffold(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, server_lr: PositiveFloat = 1.0,
             variate: Literal["II", "I"] = "II",
             weighting: Literal["uniform", "samples"] = "uniform") -> Strategy:
    """SCAFFOLD (Karimireddy et al., ICML 2020, arXiv:1910.06378).

    Each participant i starts from x and runs K corrected steps
        y <- y - lr * (g_i(y; xi_k) - c_i + c),
    then refreshes its control variate
        option II: c_i+ = c_i - c + (x - y) / (K lr)   (= mean of the K gradients it used)
        option I:  c_i+ = grad f_i(x)                  (one extra full local pass at x)
    and sends {"delta": y - x, "dc": c_i+ - c_i}. The server applies
        x <- x + server_lr * sum_S p_i delta_i,   c <- c + (1/N) sum_S dc_i,
    so c == (1/N) sum_i c_i after every round, under any participation (c, c_i start at 0).

    Args:
      lr: local step size eta_l.
      local_steps: local steps K.
      server_lr: server step eta_g (1 is the standard choice).
      variate: "II" (cheap, default) or "I" (fresh full gradient at the server model).
      weighting: "uniform" (paper: p_i = 1/|S|, dc weight 1/N) or "samples" (see
        `control_weights`).

    Shapes: server {"x": [P], "c": [P]} (both broadcast); client {"c": [m, P]};
    payload {"delta": [m, P], "dc": [m, P]}.
    """
    def init_server(x0: torch.Tensor) -> Tree:
        return {"x": x0.clone(), "c": torch.zeros_like(x0)}

    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        x = broadcast_rows(server["x"], ctx.m)
        shift = server["c"] - clients["c"]
        y, loss = local_sgd(x, oracle, local_steps, lr, direction=lambda g, k: g + shift,
                            budget=ctx.steps)
        if variate == "I":
            c_new = oracle.full(x)[1]
        elif ctx.steps is None:
            c_new = clients["c"] - server["c"] + (x - y) / (local_steps * lr)
        else:  # K_i steps each; a client that took none keeps its c_i
            k_i = ctx.steps.to(x.dtype)[:, None]
            c_new = torch.where(k_i > 0, clients["c"] - server["c"] + (x - y) / (k_i.clamp_min(1) * lr),
                                clients["c"])
        return {"delta": y - x, "dc": c_new - clients["c"]}, {"c": c_new}, {"loss": loss}

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        if not reduced:
            return server
        return {**server, "x": server["x"] + server_lr * reduced["delta"],
                "c": server["c"] + reduced["dc"]}

    return Strategy(init_server=init_server, init_clients=zero_controls, local=local,
                    server_update=server_update,
                    weights=lambda server, ctx: control_weights(weighting, ctx),
                    broadcast=("x", "c"), payload=model_rows("delta", "dc"), local_steps=local_steps)
