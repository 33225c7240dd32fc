"""Per-client evaluation metrics: what personalised-FL and fairness papers report.

Given every client's number of correct predictions and of test samples on its own test
split (`DataProblem.evaluate_clients`), `client_metrics` returns the mean, the
sample-weighted mean, the worst-10%, the 10th / 50th / 90th percentiles and the spread
(standard deviation) of client accuracy. `client_test_sums` scores every client of a process
(the server model, or each gossip node's own model) for the round kernel's metrics line
(`fedsim.round.evaluation`), the same way on every engine.

References: Li, Sanjabi, Beirami, Smith, "Fair Resource Allocation in Federated Learning"
(q-FFL), ICLR 2020 (worst-10% and variance of client accuracy); Li, Hu, Beirami, Smith,
"Ditto", ICML 2021; Caldas et al., LEAF, arXiv 1812.01097 (per-user test data).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

EVAL_BLOCK = 64
"""Clients scored per `evaluate_clients` call (a fixed block, whatever the engine's chunking)
when each client has its own model."""


def _np(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor, possibly on a GPU
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=np.float64).reshape(-1)


def client_metrics(correct: Any, total: Any, loss_sum: Any = None) -> dict[str, float | int]:
    """Summary of per-client test accuracy (clients with no test samples are left out).

    Args:
      correct: [N] correct predictions of client k's model on client k's test split.
      total: [N] size of client k's test split.
      loss_sum: optional [N] summed test loss per client.

    Returns:
      ``client_acc_mean`` (1/K) sum_k a_k with a_k = correct_k / total_k over the K clients
      with total_k > 0; ``client_acc_weighted`` sum correct / sum total (sample-weighted);
      ``client_acc_worst10`` the mean of the ceil(K / 10) lowest a_k; ``client_acc_std`` the
      population standard deviation of a_k; ``client_acc_p10`` / ``client_acc_median`` /
      ``client_acc_p90`` the percentiles of a_k (linear interpolation, numpy's default);
      ``client_loss`` sum loss / sum total (when
      `loss_sum` is given); ``clients_evaluated`` K. Empty dict when K = 0.
    """
    c, n = _np(correct), _np(total)
    keep = n > 0
    if not keep.any():
        return {}
    acc = c[keep] / n[keep]
    k = int(keep.sum())
    ranked = np.sort(acc)
    out = {"client_acc_mean": float(acc.mean()),
           "client_acc_weighted": float(c[keep].sum() / n[keep].sum()),
           "client_acc_worst10": float(ranked[: math.ceil(k / 10)].mean()),
           "client_acc_std": float(acc.std()),
           **{f"client_acc_{name}": quantile_sorted(ranked, q) for name, q in
              (("p10", 0.1), ("median", 0.5), ("p90", 0.9))},
           "clients_evaluated": k}
    if loss_sum is not None:
        out["client_loss"] = float(_np(loss_sum)[keep].sum() / n[keep].sum())
    return out


def quantile_sorted(ranked: np.ndarray, q: float) -> float:
    """The q-quantile of ascending values `ranked` [K] (K >= 1), linearly interpolated between
    the order statistics at (K - 1) q: numpy's default method, bit for bit (its two-sided lerp,
    from the lower value below the midpoint, from the upper one above it).

    Written out because `np.quantile`'s first call imports `numpy.ma` (~40 ms, inside the first
    metrics line's time).
    """
    pos = (ranked.size - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, ranked.size - 1)
    a, b, g = float(ranked[lo]), float(ranked[hi]), pos - lo
    return b - (b - a) * (1 - g) if g >= 0.5 else a + (b - a) * g


def client_test_sums(problem: Any, models_of: Any, ids: torch.Tensor, n: int,
                     block: int = EVAL_BLOCK) -> torch.Tensor | None:
    """Per client: (correct, count, loss sum) on its own test split, float64 [3, n] on the CPU.

    Args:
      problem: a `fedsim.problem.DataProblem` (None is returned when it holds no per-client
        test splits, or for problems without them, such as the quadratics of `fedsim.testing`).
      models_of: chunk of client ids [k] -> the models [k, P] they are scored with.
      ids: the clients this process holds; columns of other clients stay 0 (so that a sum over
        MPI ranks gives every client's entry).
      n: the number of clients N.
      block: clients per `evaluate_clients` call (clients scored by one shared model: all of
        them, so their test rows go through one pass).
    """
    if getattr(problem, "client_test", None) is None:
        return None
    out = torch.zeros(3, n, dtype=torch.float64)
    for j in range(0, ids.numel(), block):
        chunk = ids[j:j + block]
        loss, correct, count = problem.evaluate_clients(models_of(chunk), chunk)
        out[:, chunk.cpu()] = torch.stack([correct, count, loss]).cpu()
    return out
