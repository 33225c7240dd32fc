"""Per-client evaluation metrics: what personalised-FL and fairness papers report.

Given every client's number of correct predictions and of test samples on its own test
split (`DataProblem.evaluate_clients`), `client_metrics` returns the mean, the
sample-weighted mean, the worst-10% and the spread (standard deviation) of client accuracy.

References: Li, Sanjabi, Beirami, Smith, "Fair Resource Allocation in Federated Learning"
(q-FFL), ICLR 2020 (worst-10% and variance of client accuracy); Li, Hu, Beirami, Smith,
"Ditto", ICML 2021; Caldas et al., LEAF, arXiv 1812.01097 (per-user test data).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


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
      population standard deviation of a_k; ``client_loss`` sum loss / sum total (when
      `loss_sum` is given); ``clients_evaluated`` K. Empty dict when K = 0.
    """
    c, n = _np(correct), _np(total)
    keep = n > 0
    if not keep.any():
        return {}
    acc = c[keep] / n[keep]
    k = int(keep.sum())
    worst = np.sort(acc)[: math.ceil(k / 10)]
    out = {"client_acc_mean": float(acc.mean()),
           "client_acc_weighted": float(c[keep].sum() / n[keep].sum()),
           "client_acc_worst10": float(worst.mean()),
           "client_acc_std": float(acc.std()),
           "clients_evaluated": k}
    if loss_sum is not None:
        out["client_loss"] = float(_np(loss_sum)[keep].sum() / n[keep].sum())
    return out
