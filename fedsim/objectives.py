"""Problem utilities: regularisers added to every client's loss, and smoothness estimates.

These belong to the problem, not to an algorithm: a regulariser set in the scenario
(``model: {nonconvex_reg: 0.1}``) changes every strategy's objective, and a strategy that needs
a local smoothness constant (EF21-W) asks the oracle for it.
"""

from __future__ import annotations

import torch

from fedsim import rng
from fedsim.types import Oracle


def nonconvex_reg(x: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """lam * sum_j x_j^2 / (1 + x_j^2) per row [m] and its gradient 2 lam x / (1 + x^2)^2 [m, P].

    The nonconvex regulariser of the EF21 experiments (Richtárik et al. 2021, arXiv:2106.05203,
    Sec. 5: logistic regression with lambda = 0.1).
    """
    q = 1 + x * x
    return lam * (x * x / q).sum(1), 2 * lam * x / (q * q)


class Regularized:
    """An oracle whose losses and gradients include `nonconvex_reg` with weight `lam`."""

    def __init__(self, oracle: Oracle, lam: float) -> None:
        self.oracle, self.lam = oracle, lam

    def _add(self, x: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        r, rg = nonconvex_reg(x, self.lam)
        return loss + r.to(loss.dtype), grad + rg

    def __call__(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._add(x, *self.oracle(x, step))

    def full(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._add(x, *self.oracle.full(x))


def estimate_smoothness(oracle: Oracle, x: torch.Tensor, ids: torch.Tensor, *, iters: int = 20,
                        eps: float = 1e-4, seed: int = 0) -> torch.Tensor:
    """[m] largest Hessian eigenvalue of each client's full loss at x [m, P] (power iteration).

    Hessian-vector products by finite differences of `oracle.full` (`iters` + 1 gradient calls),
    start vector keyed by (seed, STRATEGY, client id). A local estimate of L_i at x: a lower bound
    of the global constant for logistic-type losses, exact for quadratics.
    """
    p = torch.arange(x.shape[1], device=x.device)
    v = rng.uniform_torch(seed, rng.STRATEGY, -1, ids[:, None], p[None, :], device=x.device) - 0.5
    v = v.to(x.dtype)
    _, g0 = oracle.full(x)
    lam = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(iters):
        v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-300)
        hv = (oracle.full(x + eps * v)[1] - g0) / eps
        lam, v = (hv * v).sum(1), hv
    return lam.abs().clamp_min(1e-12)
