"""A linear test problem for the strategy tests: f_i(x) = <g_i, x>, so every local step of client
i sees the same gradient g_i and its update after K SGD steps is -lr K g_i in every round."""

from __future__ import annotations

import numpy as np
import torch


class LinearOracle:
    """(loss [m], grad [m, P]) = (<g_i, x_i>, g_i) for the block's rows g [m, P]."""

    def __init__(self, g: torch.Tensor) -> None:
        self.g = g

    def __call__(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (x * self.g).sum(-1), self.g.expand_as(x)

    def full(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(x, 0)


class LinearProblem:
    """N clients with gradients g [N, P] (float64, one sample each, full-batch, no test set)."""

    def __init__(self, g) -> None:
        self.g = torch.as_tensor(g, dtype=torch.float64)
        self.num_clients, self.dim = self.g.shape
        self.num_params = self.dim
        self.sizes, self.device, self.dtype = np.ones(self.num_clients, np.int64), "cpu", torch.float64
        self.batch_size, self.flops_per_sample = None, 0.0

    def oracle(self, ids: torch.Tensor, round: int) -> LinearOracle:
        return LinearOracle(self.g[ids])

    def evaluate(self, x: torch.Tensor) -> None:
        return None

    def restrict(self, owned) -> LinearProblem:
        return self
