"""FedVARP and MIFA: server tables of every client's latest update (FedAU's stateful baselines).

Both run FedAvg's local training (payload Delta_i = y_i - x) and keep each client's latest
update y_i, O(N P) memory, as in the IBM/fedau reference code (`-weighting fedvarp | mifa`):

  fedvarp  x += eta * [mean_{i in S}(Delta_i - y_i) + mean_{all j} y_j], then y_i := Delta_i
  mifa     y_i := Delta_i for i in S, then x += eta * mean_{all j} y_j

References:
  Jhunjhunwala, Sharma, Nagarkatti, Joshi, "FedVARP: Tackling the Variance Due to Partial
  Client Participation in Federated Learning", UAI 2022, arXiv:2207.14130.
  Gu, Huang, Zhang, Huang, "Fast Federated Learning in the Presence of Arbitrary Device
  Unavailability" (MIFA), NeurIPS 2021, arXiv:2106.04159.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedsim.constraints import PositiveFloat, PositiveInt
from fedsim.types import Oracle, RoundCtx, Strategy, Tree, model_rows
from strategies import STRATEGIES
from strategies.fedau import LOCAL_STEPS, LR, over_all
from strategies.local import local_delta


def _table_strategy(lr: float, local_steps: int,
                    apply: Callable[[Tree, Tree, RoundCtx], Tree]) -> Strategy:
    """Strategies that store each client's latest update y_i (O(N P) memory).

    Payload dy_i = Delta_i - y_i (old), reduced with weight 1/N, so reduced["dy"] is the
    change of the table mean ybar = (1/N) sum_j y_j (never-seen clients have y_j = 0).
    `apply(server, reduced, ctx)` returns the new server tree.
    """
    def init_server(x0: torch.Tensor) -> Tree:
        return {"x": x0.clone(), "ybar": torch.zeros_like(x0)}

    def init_clients(x0: torch.Tensor, ids: torch.Tensor) -> Tree:
        return {"y": torch.zeros((ids.numel(), x0.shape[-1]), dtype=x0.dtype, device=x0.device)}

    def local(server: Tree, clients: Tree, oracle: Oracle,
              ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        delta, loss = local_delta(server, oracle, ctx, lr, local_steps)
        return {"dy": delta - clients["y"]}, {"y": delta}, {"loss": loss}

    return Strategy(init_server=init_server, init_clients=init_clients, local=local,
                    server_update=apply, weights=lambda server, ctx: over_all(ctx),
                    payload=model_rows("dy"), local_steps=local_steps)


@STRATEGIES.register("fedvarp")
def fedvarp(*, lr: PositiveFloat = LR, local_steps: PositiveInt = LOCAL_STEPS,
            server_lr: PositiveFloat = 1.0) -> Strategy:
    """FedVARP (Jhunjhunwala et al., UAI 2022): SAGA-style variance reduction over clients.

    x <- x + eta * [ mean_{i in S}(Delta_i - y_i) + mean_{all j} y_j ], then y_i := Delta_i for
    i in S. The second term uses the table from BEFORE this round's refresh; a round without
    participants leaves x unchanged (both as IBM/fedau `-weighting fedvarp`). y_j = 0 until
    client j first takes part. The server keeps ybar = mean_j y_j, updated from the reduced
    payload (mean_{i in S} dy_i = (N / |S|) * reduced["dy"]).

    Args:
      lr: local step size. local_steps: local SGD steps per round. server_lr: eta.

    Shapes: server {"x", "ybar": [P]}; client {"y": [m, P]} (O(N P) memory);
    payload {"dy": [m, P]}.
    """
    def apply(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        if not reduced:
            return server
        scale = ctx.num_clients / max(ctx.num_participants, 1)
        step = scale * reduced["dy"] + server["ybar"]
        ybar = server["ybar"] + reduced["dy"]
        return {**server, "x": server["x"] + server_lr * step, "ybar": ybar}

    return _table_strategy(lr, local_steps, apply)


@STRATEGIES.register("mifa")
def mifa(*, lr: PositiveFloat = LR, local_steps: PositiveInt = LOCAL_STEPS,
         server_lr: PositiveFloat = 1.0) -> Strategy:
    """MIFA (Gu et al., NeurIPS 2021): apply the mean of every client's latest update.

    y_i := Delta_i for i in S, then x <- x + eta * (1/N) sum_{all j} y_j, stale updates
    included and applied also in rounds nobody takes part in (IBM/fedau `-weighting mifa`).
    y_j = 0 until client j first takes part. With full participation MIFA is FedAvg with
    uniform weights.

    Args:
      lr: local step size. local_steps: local SGD steps per round. server_lr: eta.

    Shapes: server {"x", "ybar": [P]}; client {"y": [m, P]} (O(N P) memory);
    payload {"dy": [m, P]}.
    """
    def apply(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        ybar = server["ybar"] + reduced["dy"] if reduced else server["ybar"]
        return {**server, "x": server["x"] + server_lr * ybar, "ybar": ybar}

    return _table_strategy(lr, local_steps, apply)


__all__ = ["fedvarp", "mifa"]
