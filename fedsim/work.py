"""Heterogeneous local work: how many local steps each client takes in a round.

By default every client runs its strategy's own number of local steps (`local_steps`, `tau`).
A scenario's ``work:`` section replaces it, for every strategy that trains with the shared step
loop (`strategies.local.run_local`), by a per-client budget K_i: clients stop updating after
K_i steps (their optimizer state too), so fast and slow devices, or "E epochs over each client's
own data", can be simulated without touching the strategy. FedNova (Wang et al., NeurIPS 2020,
arXiv:2007.07481) studies exactly this objective inconsistency.

Every draw is keyed by (seed, WORK, client[, round]) so the budget of a client never depends on
execution order, chunking, rank layout or which clients are simulated together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from fedsim import rng
from fedsim.constraints import NonNegativeInt, PositiveFloat, PositiveInt
from fedsim.registry import Registry

WORK = Registry("work", builtins=("fedsim.work",), reserved=("num_clients", "seed", "sizes", "batch_size"))


class LocalWork(Protocol):
    """Per-client local-step budgets of a round (None: the strategy's own counts)."""

    def steps(self, round: int, ids: np.ndarray) -> np.ndarray | None:
        """int64 [m] local steps of clients `ids` in `round`, or None."""
        ...


class _Budget:
    """A budget given by a function of (round, ids)."""

    def __init__(self, fn: Callable[[int, np.ndarray], np.ndarray | None]) -> None:
        self._fn = fn

    def steps(self, round: int, ids: np.ndarray) -> np.ndarray | None:
        return self._fn(round, np.asarray(ids, dtype=np.int64))


@WORK.register("strategy")
def strategy(*, num_clients: int, seed: int, sizes: np.ndarray, batch_size: int | None) -> LocalWork:
    """Every client runs the strategy's own number of local steps (the default)."""
    return _Budget(lambda t, ids: None)


@WORK.register("steps")
def steps(*, steps: list[NonNegativeInt], num_clients: int, seed: int, sizes: np.ndarray,
          batch_size: int | None) -> LocalWork:
    """Fixed local steps per client: `steps` lists K_i for every client (length N)."""
    if len(steps) != num_clients:
        raise ValueError(f"steps: needs one count per client ({num_clients}), got {len(steps)}")
    table = np.asarray(steps, dtype=np.int64)
    return _Budget(lambda t, ids: table[ids])


@WORK.register("uniform")
def uniform(*, low: NonNegativeInt = 1, high: PositiveInt = 10, per_round: bool = False,
            num_clients: int, seed: int, sizes: np.ndarray, batch_size: int | None) -> LocalWork:
    """K_i uniform on the integers low..high, drawn once per client (or every round with
    `per_round`), keyed by (seed, WORK, client[, round]): FedNova's setting (K_i ~ U[2, 20])."""
    if low > high:
        raise ValueError(f"low: must be <= high ({high}), got {low}")

    def draw(t: int, ids: np.ndarray) -> np.ndarray:
        u = rng.uniform_np(seed, rng.WORK, ids, t) if per_round else rng.uniform_np(seed, rng.WORK, ids, -1)
        return low + np.floor(u * (high - low + 1)).astype(np.int64)
    return _Budget(draw)


@WORK.register("epochs")
def epochs(*, epochs: PositiveFloat = 1.0, num_clients: int, seed: int, sizes: np.ndarray,
           batch_size: int | None) -> LocalWork:
    """K_i = ceil(epochs * n_i / B): `epochs` passes over each client's own data with the
    strategy's minibatch size B (McMahan et al. 2017's E; a full batch makes K_i = ceil(epochs))."""
    n = np.asarray(sizes, dtype=np.float64)
    per_step = float(batch_size) if batch_size else n
    table = np.maximum(1, np.ceil(epochs * n / per_step - 1e-9)).astype(np.int64)
    return _Budget(lambda t, ids: table[ids])


def budget_tensor(work: LocalWork | None, round: int, ids: torch.Tensor) -> torch.Tensor | None:
    """The budgets of a block as an int64 tensor on the ids' device (None: no budget)."""
    if work is None:
        return None
    out = work.steps(round, ids.cpu().numpy())
    return None if out is None else torch.as_tensor(out, dtype=torch.int64, device=ids.device)


__all__ = ["WORK", "LocalWork", "budget_tensor"]
