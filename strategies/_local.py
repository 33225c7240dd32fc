"""Local-training building blocks shared by strategies (pure, batched over clients)."""

from __future__ import annotations

from typing import Callable

import torch

from fedsim.types import Oracle, RoundCtx, Tree


def broadcast_rows(x: torch.Tensor, m: int) -> torch.Tensor:
    """x [P] or [m, P] -> a fresh [m, P] tensor (never a view of the input)."""
    return x.expand(m, -1).clone() if x.dim() == 1 else x.clone()


def local_sgd(x: torch.Tensor, oracle: Oracle, steps: int, lr: float,
              direction: Callable[[torch.Tensor, int], torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`steps` steps of y <- y - lr * d(g, k) on every client row at once.

    Args:
      x: [m, P] starting points (not modified).
      oracle: minibatch gradients for this block and round.
      steps: number of local steps K.
      lr: local step size.
      direction: maps (stochastic gradient [m, P], step k) to the step direction; None uses
        the gradient (plain SGD). SCAFFOLD passes g - c_i + c, FedAvg-M beta*g + (1-beta)*g_server.

    Returns:
      (y [m, P] after K steps, mean training loss over the K steps [m]).
    """
    y = x
    loss_sum = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for k in range(steps):
        loss, g = oracle(y, k)
        loss_sum += loss.double()
        y = torch.add(y, g if direction is None else direction(g, k), alpha=-lr)
    return y, loss_sum / max(steps, 1)


def local_delta(server: Tree, oracle: Oracle, ctx: RoundCtx, lr: float,
                steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FedAvg's local training from the server model: (Delta = y - x [m, P], mean loss [m])."""
    x = broadcast_rows(server["x"], ctx.m)
    y, loss = local_sgd(x, oracle, steps, lr)
    return y - x, loss


def delta_local(lr: float, steps: int) -> Callable[..., tuple[Tree, Tree, Tree]]:
    """A stateless `local`: send Delta_i after `steps` SGD steps (FedAvg and its server variants)."""
    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        delta, loss = local_delta(server, oracle, ctx, lr, steps)
        return {"delta": delta}, clients, {"loss": loss}
    return local
