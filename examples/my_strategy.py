"""A user strategy in its own module: FedAvg with clipped client updates.

Nothing in fedsim has to change to use it. Point a scenario at the factory by dotted path::

    strategy: {name: "examples.my_strategy:factory", lr: 0.1, local_steps: 5, max_norm: 0.5,
               batch_size: 16}

(run from the repository root with ``python -m fedsim run ...`` or ``PYTHONPATH=. fedsim run``,
so that ``examples`` is importable), or ship it in a package that declares the entry point
``[project.entry-points."fedsim.strategies"] clipped-fedavg = "mypkg.my_strategy:factory"``.

The factory's typed keyword arguments are the scenario keys: fedsim validates them against the
annotations (unknown keys and out-of-range values are exit-code-2 errors naming the key); the
range types come from `fedsim.constraints`. A combination the factory cannot accept raises
``ValueError("<param>: why")``, which the scenario layer reports as that key's error.
"""

from __future__ import annotations

import torch

from fedsim.constraints import PositiveFloat, PositiveInt
from fedsim.types import Oracle, RoundCtx, Strategy, Tree, no_clients


def factory(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10,
            max_norm: PositiveFloat = 1.0, server_lr: PositiveFloat = 1.0) -> Strategy:
    """FedAvg whose client updates are clipped to L2 norm `max_norm` before averaging.

    Delta_i = y_i - x after `local_steps` SGD steps; the client sends
    Delta_i * min(1, max_norm / ||Delta_i||) and the server applies
    x <- x + server_lr * sum_{i in S} (n_i / sum_S n_j) clip(Delta_i). Clipping bounds each
    client's influence, as in DP-FedAvg (McMahan et al., ICLR 2018, arXiv:1710.06963) without
    the noise.

    Shapes: server {"x": [P]}; payload {"delta": [m, P]}; no client state.
    """
    def init_server(x0: torch.Tensor) -> Tree:
        return {"x": x0.clone()}

    def local(server: Tree, clients: Tree, oracle: Oracle,
              ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        x = server["x"].expand(ctx.m, -1)          # [m, P]: every participant starts from x
        y = x.clone()
        loss = torch.zeros(ctx.m, dtype=x.dtype, device=x.device)
        for k in range(local_steps):               # a loop over steps, never over clients
            step_loss, g = oracle(y, k)            # minibatch k of every client at once
            y = y - lr * g
            loss = loss + step_loss / local_steps
        delta = y - x
        norm = delta.norm(dim=1, keepdim=True)
        clipped = delta * torch.clamp(max_norm / norm.clamp_min(1e-30), max=1.0)
        return {"delta": clipped}, clients, {"loss": loss}

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        if not reduced:                            # nobody took part this round
            return server
        return {**server, "x": server["x"] + server_lr * reduced["delta"]}

    return Strategy(init_server=init_server, init_clients=no_clients, local=local,
                    server_update=server_update)   # weights=None: n_i / sum_S n_j
