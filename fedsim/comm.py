"""Communication: the few collective primitives strategies need, and byte accounting.

The engine's round loop talks to a `Comm`; the in-process implementation is trivial (the
whole population lives in one process), the MPI implementation (`fedsim.engines.mpi`) moves
the same buffers with mpi4py. Strategies never see a Comm.

Byte accounting counts what crosses the (simulated) network: the server's broadcast keys to
every participant, every participant's payload (or the bits its compressor reports), and
for gossip one payload per directed edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedsim.types import Tree


def weighted_sum(payload: Tree, weights: torch.Tensor | dict[str, torch.Tensor]) -> Tree:
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


def tree_bytes(tree: Tree, rows: bool = True) -> torch.Tensor | int:
    """Dense size in bytes: per row [m] (rows=True) or of the whole tree."""
    if rows:
        total = None
        for v in tree.values():
            per = v[0].numel() * v.element_size() if v.shape[0] else 0
            t = torch.full((v.shape[0],), per, dtype=torch.int64, device=v.device)
            total = t if total is None else total + t
        return total if total is not None else torch.zeros(0, dtype=torch.int64)
    return sum(v.numel() * v.element_size() for v in tree.values())


@dataclass
class ByteCounter:
    """Cumulative bytes sent up (clients -> server, or node -> neighbour) and down."""

    up: int = 0
    down: int = 0
    per_round: list[tuple[int, int]] = field(default_factory=list)

    def add(self, up: int, down: int) -> None:
        self.up += int(up)
        self.down += int(down)
        self.per_round.append((int(up), int(down)))


class LocalComm:
    """One process holds every client: reductions are identities."""

    rank = 0
    size = 1

    def allreduce(self, tree: Tree) -> Tree:
        """Sum of `tree` over all processes."""
        return tree

    def allreduce_scalars(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def mix(self, mixing: dict[str, torch.Tensor], payload: Tree, owned: torch.Tensor,
            ops: dict[str, str]) -> Tree:
        """Rows `owned` of (M_k @ payload[k]) for each key; payload rows are the owned nodes.

        `mixing` maps an operator name ("W", "mean") to a sparse [n, n] matrix.
        """
        return {k: torch.sparse.mm(mixing[ops.get(k, "W")], v.reshape(v.shape[0], -1)).reshape(v.shape)
                for k, v in payload.items()}
