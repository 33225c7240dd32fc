"""Decentralized SGD (gossip): local SGD steps on every node, then one mixing step with W.

References:
  Lian, Zhang, Zhang, Hsieh, Zhang, Liu, "Can Decentralized Algorithms Outperform Centralized
  Algorithms? A Case Study for Decentralized Parallel Stochastic Gradient Descent",
  NeurIPS 2017, arXiv:1705.09056 (D-PSGD, Algorithm 1).
  Koloskova, Loizou, Boreiri, Jaggi, Stich, "A Unified Theory of Decentralized SGD with Changing
  Topology and Local Updates", ICML 2020, arXiv:2003.10422 (adapt-then-combine with local steps).
"""

from __future__ import annotations

from typing import Literal

import torch

from fedsim.constraints import NonNegativeFloat, PositiveInt
from fedsim.types import Oracle, RoundCtx, Strategy, Tree, model_rows
from strategies import STRATEGIES
from strategies.local import broadcast_rows, local_sgd


def node_models(x0: torch.Tensor, ids: torch.Tensor) -> Tree:
    """`init_clients` of gossip strategies: {"x": [m, P]} from a shared [P] or per-node [m, P] x0."""
    return {"x": broadcast_rows(x0, ids.numel())}


@STRATEGIES.register("gossip")
def gossip(*, lr: NonNegativeFloat = 0.1, local_steps: PositiveInt = 1,
           order: Literal["atc", "dpsgd"] = "atc") -> Strategy:
    """D-SGD: every node takes `local_steps` SGD steps and averages with its neighbours via W.

    With W the topology's mixing matrix of the round (doubly stochastic, W_ij > 0 only on
    edges and the diagonal; static or time-varying, chosen by the scenario's `topology`) and
    y_i the result of K = `local_steps` SGD steps of size `lr` from x_i:

      order "atc" (adapt-then-combine, Koloskova et al. 2020):  x_i <- sum_j W_ij y_j
      order "dpsgd" (Lian et al. 2017):  x_i <- sum_j W_ij x_j + (y_i - x_i)
                                          (K = 1: sum_j W_ij x_j - lr * g_i(x_i))

    The two orders have different fixed points on heterogeneous data. Every node takes part
    every round; the engine multiplies the payload by the sparse W (cost linear in edges) and
    counts one payload per directed edge. Several gossip steps per round (W^Q) are not offered:
    the engine performs exactly one mixing per payload key and round.

    Args:
      lr: local step size eta (0 gives pure gossip averaging).
      local_steps: SGD steps K before (atc) or alongside (dpsgd) the mixing.
      order: "atc" or "dpsgd" (see above).

    Shapes: node state {"x": [m, P]} (+ {"step": [m, P]}, the pending local update, for
    dpsgd); payload {"x": [m, P]}.
    """
    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        x = clients["x"]
        y, loss = local_sgd(x, oracle, local_steps, lr, budget=ctx.steps)
        if order == "atc":
            return {"x": y}, clients, {"loss": loss}
        return {"x": x}, {"x": x, "step": y - x}, {"loss": loss}

    def node_update(clients: Tree, mixed: Tree, ctx: RoundCtx) -> Tree:
        if order == "atc":
            return {"x": mixed["x"]}
        return {"x": mixed["x"] + clients["step"], "step": clients["step"]}

    def init_clients(x0: torch.Tensor, ids: torch.Tensor) -> Tree:
        tree = node_models(x0, ids)
        if order == "dpsgd":
            tree["step"] = torch.zeros_like(tree["x"])
        return tree

    return Strategy(init_server=lambda x0: {}, init_clients=init_clients, local=local,
                    node_update=node_update, comm="mix", mixing={"x": "W"}, broadcast=(),
                    payload=model_rows("x"), local_steps=local_steps)
