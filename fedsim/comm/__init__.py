"""Communication: the weighted-sum monoid, and the in-process transport.

A round's reduction is a weighted sum over participants, computed block by block
(`weighted_sum`) and combined with `add_into`: chunks, MPI ranks and Flower messages only change
the summation order, never the algorithm (pfl-research's accumulate / worker_reduce split).
`LocalComm` is the `fedsim.types.Comm` of a process that holds every client; `fedsim.comm.mpi`
moves the same buffers with mpi4py. Strategies never see a Comm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedsim.types import Tree, Weights


def weighted_sum(payload: Tree, weights: Weights) -> Tree:
    """sum_i w_i * payload_i per key; payload [m, ...], weights [m] or {key: [m]}."""
    out = {}
    for k, v in payload.items():
        w = weights[k] if isinstance(weights, dict) else weights
        out[k] = torch.tensordot(w.to(v.dtype), v, dims=([0], [0]))
    return out


def add_into(acc: Tree | None, part: Tree) -> Tree:
    """Monoid step of the reduction: acc + part (acc None means empty)."""
    if acc is None:
        return dict(part)
    return {k: acc[k] + part[k] for k in acc}


def sparse_mix(op: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """op [n, k] (sparse CSR) @ rows [k, ...] -> [n, ...] (trailing dims flattened and restored)."""
    out = torch.sparse.mm(op, rows.reshape(rows.shape[0], -1))
    return out.reshape(op.shape[0], *rows.shape[1:])


class Ready:
    """An already complete reduction (`fedsim.types.Pending`)."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree

    def test(self) -> None:
        """Nothing in flight."""

    def wait(self) -> Tree:
        return self.tree


class LocalComm:
    """One process holds every client: reductions are identities (`fedsim.types.Comm`)."""

    rank = 0
    size = 1

    def allreduce(self, tree: Tree | None, channel: str = "default") -> Tree:
        """Sum of `tree` over all processes ({} for None)."""
        return dict(tree) if tree else {}

    def iallreduce(self, tree: Tree | None, channel: str = "default") -> Ready:
        return Ready(self.allreduce(tree, channel))

    def allreduce_scalars(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def allreduce_max(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def mix(self, mixing: dict[str, torch.Tensor], payload: Tree, owned: torch.Tensor,
            ops: Mapping[str, str]) -> Tree:
        """Rows `owned` of (M_k @ payload[k]) for each key; payload rows are the owned nodes.

        `mixing` maps an operator name ("W", "mean") to a sparse [n, n] matrix.
        """
        return {k: sparse_mix(mixing[ops.get(k, "W")], v) for k, v in payload.items()}

    def progress(self) -> None:
        """Nothing in flight."""


__all__ = ["weighted_sum", "add_into", "sparse_mix", "Ready", "LocalComm"]
