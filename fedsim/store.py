"""Per-client strategy state, allocated only for clients that have taken part.

A strategy's `init_clients` defines the state of one client (SCAFFOLD's c_i, EF21's g_i,
client momentum). The store keeps those rows in one growable buffer per key and maps client
id -> row, so 10,000 clients at 1 % participation only pay for the clients actually seen.
A strategy without client state costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedsim.types import Tree


class ClientStore:
    """Rows of per-client state for a population of `num_clients` (or a rank's slice of it)."""

    def __init__(self, init_fn: Callable[[torch.Tensor, torch.Tensor], Tree],
                 x0_of: Callable[[torch.Tensor], torch.Tensor], num_clients: int,
                 device: torch.device) -> None:
        """`x0_of(ids)` gives the initial model of those clients: [P] shared, or [m, P]."""
        self.init_fn, self.x0_of = init_fn, x0_of
        self.row_of = torch.full((num_clients,), -1, dtype=torch.int64, device=device)
        self.buffers: Tree = {}
        self.used = 0
        self.stateless: bool | None = None

    def gather(self, ids: torch.Tensor) -> Tree:
        """State rows of clients `ids` [m] (initialised on first use). Returns copies."""
        if self.stateless:
            return {}
        rows = self.row_of[ids]
        new = ids[rows < 0]
        if new.numel():
            self._allocate(new)
            rows = self.row_of[ids]
        return {k: v[rows] for k, v in self.buffers.items()}

    def scatter(self, ids: torch.Tensor, tree: Tree) -> None:
        """Write back the state rows of clients `ids`."""
        if not tree:
            return
        rows = self.row_of[ids]
        for k, v in tree.items():
            self.buffers[k][rows] = v.to(self.buffers[k].dtype)

    def _allocate(self, new: torch.Tensor) -> None:
        init = self.init_fn(self.x0_of(new), new)
        if self.stateless is None:
            self.stateless = not init
        if not init:
            return
        need = self.used + new.numel()
        for k, v in init.items():
            buf = self.buffers.get(k)
            if buf is None or buf.shape[0] < need:
                cap = max(need, 2 * (0 if buf is None else buf.shape[0]), 16)
                grown = torch.zeros((cap, *v.shape[1:]), dtype=v.dtype, device=v.device)
                if buf is not None:
                    grown[: self.used] = buf[: self.used]
                self.buffers[k] = grown
            self.buffers[k][self.used:need] = v
        self.row_of[new] = torch.arange(self.used, need, device=self.row_of.device)
        self.used = need

    def rows(self) -> tuple[torch.Tensor, Tree]:
        """(ids [used] of the clients with state, in row order; their state rows) for checkpoints."""
        ids = torch.full((self.used,), -1, dtype=torch.int64, device=self.row_of.device)
        seen = torch.nonzero(self.row_of >= 0).flatten()
        ids[self.row_of[seen]] = seen
        return ids.cpu(), {k: v[: self.used].detach().cpu() for k, v in self.buffers.items()}

    def load(self, ids: torch.Tensor, rows: Tree) -> None:
        """Replace the state by rows of clients `ids` (from `rows`; state of others is fresh)."""
        dev = self.row_of.device
        self.row_of.fill_(-1)
        self.row_of[ids.to(dev)] = torch.arange(ids.numel(), device=dev)
        self.used = int(ids.numel())
        self.buffers = {k: v.to(dev).clone() for k, v in rows.items()}
        if self.used:
            self.stateless = not rows

    def nbytes(self) -> int:
        """Bytes of per-client state actually held (allocated rows only)."""
        return sum(v[: self.used].numel() * v.element_size() for v in self.buffers.values())
