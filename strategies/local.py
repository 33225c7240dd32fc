"""Local training shared by strategies: optimizers as (init, update) pairs and one step loop.

An optimizer is a NamedTuple of two pure functions over client-stacked rows (the JAX
`example_libraries.optimizers` / optax shape): ``init(rows [m, P]) -> state`` and
``update(y [m, P], g [m, P], state, lr) -> (y', state')``. Its state is per-client and a
strategy that keeps it across rounds stores it in its client tree (CO2's inner optimizer,
gossip nodes' momentum). In a scenario: ``inner: {name: adamw, beta1: 0.9}``; in Python
``adamw(beta1=0.9)``. `run_local` is the one loop over local steps every strategy uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from fedsim.constraints import Momentum, NonNegativeFloat, PositiveFloat
from fedsim.types import LocalOptimizer, Oracle, RoundCtx, Tree
from strategies import OPTIMIZERS

Direction = Callable[[torch.Tensor, int], torch.Tensor]


class Optimizer(NamedTuple):
    """A local optimizer (`fedsim.types.LocalOptimizer`): init / update, plus its `spec`."""

    init: Callable[[torch.Tensor], Tree]
    update: Callable[[torch.Tensor, torch.Tensor, Tree, float], tuple[torch.Tensor, Tree]]
    spec: Mapping[str, Any] | None = None


def _no_state(rows: torch.Tensor) -> Tree:
    return {}


@OPTIMIZERS.register("sgd")
def sgd(*, weight_decay: NonNegativeFloat = 0.0) -> Optimizer:
    """SGD: y <- y - lr (g + weight_decay y) (L2 weight decay, as torch.optim.SGD)."""
    def update(y: torch.Tensor, g: torch.Tensor, state: Tree, lr: float) -> tuple[torch.Tensor, Tree]:
        if weight_decay:
            g = g + weight_decay * y
        return torch.add(y, g, alpha=-lr), state
    return Optimizer(_no_state, update)


@OPTIMIZERS.register("momentum")
def momentum(*, mass: Momentum = 0.9, weight_decay: NonNegativeFloat = 0.0) -> Optimizer:
    """Heavy ball as torch.optim.SGD(momentum=mass, dampening=0): b <- mass b + g, y <- y - lr b."""
    def init(rows: torch.Tensor) -> Tree:
        return {"buf": torch.zeros_like(rows)}

    def update(y: torch.Tensor, g: torch.Tensor, state: Tree, lr: float) -> tuple[torch.Tensor, Tree]:
        if weight_decay:
            g = g + weight_decay * y
        buf = mass * state["buf"] + g
        return y - lr * buf, {"buf": buf}
    return Optimizer(init, update)


@OPTIMIZERS.register("adamw")
def adamw(*, beta1: Momentum = 0.9, beta2: Momentum = 0.999, eps: PositiveFloat = 1e-8,
          weight_decay: NonNegativeFloat = 0.0) -> Optimizer:
    """AdamW (Loshchilov & Hutter, ICLR 2019, arXiv:1711.05101) as torch.optim.AdamW: decoupled
    weight decay y <- y (1 - lr wd), bias-corrected moments, per-client step counts."""
    def init(rows: torch.Tensor) -> Tree:
        return {"m1": torch.zeros_like(rows), "m2": torch.zeros_like(rows),
                "step": rows.new_zeros(rows.shape[0])}

    def update(y: torch.Tensor, g: torch.Tensor, state: Tree, lr: float) -> tuple[torch.Tensor, Tree]:
        t = state["step"] + 1
        m1 = beta1 * state["m1"] + (1 - beta1) * g
        m2 = beta2 * state["m2"] + (1 - beta2) * g * g
        bc1, bc2 = (1 - beta1 ** t)[:, None], (1 - beta2 ** t)[:, None]
        y = y * (1 - lr * weight_decay) if weight_decay else y
        denom = m2.sqrt() / bc2.sqrt() + eps
        return y - (lr / bc1) * m1 / denom, {"m1": m1, "m2": m2, "step": t}
    return Optimizer(init, update)


def broadcast_rows(x: torch.Tensor, m: int) -> torch.Tensor:
    """x [P] or [m, P] -> a fresh [m, P] tensor (never a view of the input)."""
    return x.expand(m, -1).clone() if x.dim() == 1 else x.clone()


class LocalRun(NamedTuple):
    """End of a block's local steps: rows y [m, P], optimizer state, mean loss [m], and the sum
    of the raw stochastic gradients [m, P] (None unless asked for)."""

    y: torch.Tensor
    state: Tree
    loss: torch.Tensor
    grad_sum: torch.Tensor | None


def _rows(mask: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[m] bool -> broadcastable against v [m, ...]."""
    return mask.view(-1, *([1] * (v.dim() - 1)))


def run_local(x: torch.Tensor, oracle: Oracle, steps: int, lr: float, opt: LocalOptimizer | None = None,
              state: Tree | None = None, direction: Direction | None = None,
              track_grads: bool = False, budget: torch.Tensor | None = None) -> LocalRun:
    """`steps` optimizer steps on every client row at once.

    Args:
      x: [m, P] starting points (not modified). oracle: minibatch gradients of the block.
      steps: local steps K. lr: local step size. opt: the optimizer (None: plain SGD).
      state: its state rows (None: fresh). direction: maps (stochastic gradient [m, P], step k)
        to what the optimizer steps along (SCAFFOLD: g - c_i + c; FedAvg-M: beta g + (1-beta) g_s).
      track_grads: also return the sum of the raw gradients (SCAFFOLD-M's control variate).
      budget: [m] int64 local steps per row (`ctx.steps`: heterogeneous local work), replacing
        K; a row stops, rows and optimizer state unchanged, after its budget. The mean loss
        and the gradient sum run over the row's own steps.
    """
    opt = opt or _SGD
    state = opt.init(x) if state is None else state
    y = x
    loss_sum = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    grad_sum = torch.zeros_like(x) if track_grads else None
    total = steps if budget is None else (int(budget.max()) if budget.numel() else 0)
    for k in range(total):
        loss, g = oracle(y, k)
        d = g if direction is None else direction(g, k)
        if budget is None:
            loss_sum += loss.double()
            grad_sum = None if grad_sum is None else grad_sum + g
            y, state = opt.update(y, d, state, lr)
            continue
        live = k < budget
        loss_sum += torch.where(live, loss.double(), 0.0)
        grad_sum = None if grad_sum is None else grad_sum + torch.where(_rows(live, g), g, 0.0)
        y_new, new = opt.update(y, d, state, lr)
        y = torch.where(_rows(live, y), y_new, y)
        state = {key: torch.where(_rows(live, v), v, state[key]) for key, v in new.items()}
    done = float(max(steps, 1)) if budget is None else budget.clamp_min(1).double()
    return LocalRun(y, state, loss_sum / done, grad_sum)


def local_sgd(x: torch.Tensor, oracle: Oracle, steps: int, lr: float,
              direction: Direction | None = None, budget: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain local SGD: (y [m, P] after `steps` steps (or `budget` per row), mean loss [m])."""
    run = run_local(x, oracle, steps, lr, direction=direction, budget=budget)
    return run.y, run.loss


def local_delta(server: Tree, oracle: Oracle, ctx: RoundCtx, lr: float,
                steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FedAvg's local training from the server model: (Delta = y - x [m, P], mean loss [m])."""
    x = broadcast_rows(server["x"], ctx.m)
    y, loss = local_sgd(x, oracle, steps, lr, budget=ctx.steps)
    return y - x, loss


def delta_local(lr: float, steps: int) -> Callable[[Tree, Tree, Oracle, RoundCtx], tuple[Tree, Tree, Tree]]:
    """A stateless `local`: send Delta_i after `steps` SGD steps (FedAvg and its server variants)."""
    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        delta, loss = local_delta(server, oracle, ctx, lr, steps)
        return {"delta": delta}, clients, {"loss": loss}
    return local


_SGD = sgd()

__all__ = ["Optimizer", "sgd", "momentum", "adamw", "broadcast_rows", "LocalRun", "run_local",
           "local_sgd", "local_delta", "delta_local"]
