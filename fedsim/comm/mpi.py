"""MPI transport of the round loop (`fedsim.types.Comm` over mpi4py), for `fedsim.engines.mpi`.

* `allreduce(tree)`: every key packed into one contiguous flat buffer per dtype, one `Allreduce`.
  A rank none of whose clients took part passes None and joins with zeros: the key/shape/dtype
  signature is agreed once per channel (one small allgather the first time), then cached.
* `iallreduce(tree)`: the same with a non-blocking `Iallreduce`; `.wait()` on the returned handle
  gives the sum (CO2's one-step-stale outer average overlaps the next round's local steps;
  `progress()` between local steps lets the MPI library move it).
* `mix(mixing, payload, owned, ops)`: neighbour exchange along the sparse mixing matrix. Each rank
  sends only the rows its neighbours' owned nodes read (point-to-point Isend/Irecv, one message
  per neighbouring rank per round, every payload key in one byte buffer), then multiplies its
  own rows of the matrix by [own rows; halo rows]. Never an Allgather of the population.

Ranks own contiguous, balanced blocks of ids: rank r owns [N*r//K, N*(r+1)//K). Time spent in
each kind of call is accumulated in `times` (seconds), for the engine's comm-share report.
mpi4py is imported lazily (only the MPI engine constructs this class).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedsim.comm import Ready, sparse_mix
from fedsim.types import Tree

Signature = tuple[tuple[str, tuple[int, ...], str], ...]


def block_starts(n: int, size: int) -> np.ndarray:
    """[size + 1] first id of each rank's block: rank r owns [starts[r], starts[r+1])."""
    return np.array([n * r // size for r in range(size + 1)], dtype=np.int64)


def _np_dtype(dt: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dt).numpy().dtype


class TreeLayout:
    """Where each key of a tree lives in one flat buffer per dtype."""

    def __init__(self, sig: Signature) -> None:
        self.sig = sig
        self.slots: dict[str, tuple[str, int, int, tuple[int, ...]]] = {}
        self.sizes: dict[str, int] = {}
        for key, shape, dt in sig:
            off = self.sizes.get(dt, 0)
            n = int(np.prod(shape)) if shape else 1
            self.slots[key] = (dt, off, n, shape)
            self.sizes[dt] = off + n

    @staticmethod
    def signature(tree: Tree) -> Signature:
        return tuple((k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tree.items())

    def pack(self, tree: Tree) -> dict[str, np.ndarray]:
        out = {}
        for dt in self.sizes:
            keys = [k for k, (d, *_) in self.slots.items() if d == dt]
            flat = torch.cat([tree[k].detach().reshape(-1) for k in keys])
            out[dt] = flat.cpu().numpy()
        return out

    def zeros(self) -> dict[str, np.ndarray]:
        return {dt: np.zeros(n, dtype=_np_dtype(getattr(torch, dt))) for dt, n in self.sizes.items()}

    def unpack(self, bufs: dict[str, np.ndarray], device: torch.device) -> Tree:
        out = {}
        for key, (dt, off, n, shape) in self.slots.items():
            out[key] = torch.from_numpy(bufs[dt][off:off + n]).reshape(shape).to(device)
        return out


class Pending:
    """A non-blocking reduction in flight (`fedsim.types.Pending`)."""

    def __init__(self, comm: MPIComm, reqs: list[Any], outs: dict[str, np.ndarray],
                 layout: TreeLayout, sends: dict[str, np.ndarray]) -> None:
        self.comm, self.reqs, self.outs, self.layout = comm, reqs, outs, layout
        self.sends: dict[str, np.ndarray] | None = sends  # alive until the reduction completes
        self.done: Tree | None = None

    def test(self) -> None:
        """Let the MPI library progress the reduction."""
        if self.done is None:
            from mpi4py import MPI

            MPI.Request.Testall(self.reqs)

    def wait(self) -> Tree:
        if self.done is None:
            from mpi4py import MPI

            t0 = time.perf_counter()
            MPI.Request.Waitall(self.reqs)
            self.comm.times["iallreduce_wait"] += time.perf_counter() - t0
            self.done = self.layout.unpack(self.outs, self.comm.device)
            self.sends = None
        return self.done


# ---- gossip: who sends which rows to whom ------------------------------------------------------

def _owner(starts: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rank owning each id."""
    return np.searchsorted(starts, ids, side="right") - 1


def _entries(csr: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every stored entry of a CSR matrix."""
    crow = csr.crow_indices().cpu().numpy()
    return np.repeat(np.arange(len(crow) - 1), np.diff(crow)), csr.col_indices().cpu().numpy()


def send_lists(rows: np.ndarray, cols: np.ndarray, starts: np.ndarray, rank: int
               ) -> dict[int, np.ndarray]:
    """Reader rank -> ascending global ids of this rank's nodes that its rows read."""
    mine = (_owner(starts, cols) == rank) & (_owner(starts, rows) != rank)
    readers, read = _owner(starts, rows[mine]), cols[mine]
    return {int(q): np.unique(read[readers == q]) for q in np.unique(readers)}


def halo_columns(rows: np.ndarray, cols: np.ndarray, starts: np.ndarray, rank: int) -> np.ndarray:
    """Ascending global ids of other ranks' nodes that this rank's rows read."""
    lo, hi = starts[rank], starts[rank + 1]
    mine = (rows >= lo) & (rows < hi)
    return np.unique(cols[mine & ((cols < lo) | (cols >= hi))])


def local_operator(csr: torch.Tensor, lo: int, hi: int, halo: np.ndarray) -> torch.Tensor:
    """Rows [lo, hi) of `csr` as a CSR matrix over [own nodes (hi - lo); halo nodes]."""
    crow = csr.crow_indices().cpu().numpy()
    a, b = int(crow[lo]), int(crow[hi])
    c = csr.col_indices().cpu().numpy()[a:b]
    own = (c >= lo) & (c < hi)
    local_cols = np.where(own, c - lo, (hi - lo) + np.searchsorted(halo, c))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse")
        return torch.sparse_csr_tensor(torch.as_tensor(crow[lo:hi + 1] - a), torch.as_tensor(local_cols),
                                       csr.values()[a:b].cpu(), size=(hi - lo, hi - lo + len(halo)))


class MixPlan:
    """The exchange of one round's operators for one rank.

    Attributes:
      send: reader rank -> local row indices (into this rank's payload rows) to send it.
      recv: sender rank -> number of halo rows received from it (in ascending global id).
      halo_rows: rows received per exchange. ops: operator name -> local operator
        [own, own + halo] (`local_operator`).
    """

    def __init__(self, mats: dict[str, torch.Tensor], starts: np.ndarray, rank: int,
                 device: torch.device) -> None:
        lo, hi = int(starts[rank]), int(starts[rank + 1])
        csr = {name: (m if m.layout == torch.sparse_csr else m.to_sparse_csr()) for name, m in mats.items()}
        pairs = [_entries(m) for m in csr.values()]
        rows, cols = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
        self.send = {q: torch.as_tensor(ids - lo, device=device)
                     for q, ids in send_lists(rows, cols, starts, rank).items()}
        halo = halo_columns(rows, cols, starts, rank)
        owners = _owner(starts, halo)
        self.recv = {int(q): int((owners == q).sum()) for q in np.unique(owners)}
        self.halo_rows = len(halo)
        self.ops = {name: local_operator(m, lo, hi, halo).to(device) for name, m in csr.items()}


class MPIComm:
    """The round loop's Comm over an mpi4py communicator (see module docstring).

    Args:
      comm: an mpi4py intracommunicator (the engine passes a duplicate of COMM_WORLD).
      num_clients: N, split into contiguous blocks over the ranks.
      device: where results are returned.
    """

    def __init__(self, comm: Any, num_clients: int, device: torch.device | str = "cpu") -> None:
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.starts = block_starts(num_clients, self.size)
        self.device = torch.device(device)
        self._layouts: dict[str, TreeLayout] = {}
        self._plan: tuple[tuple[Any, ...], MixPlan, dict[str, torch.Tensor]] | None = None
        self._inflight: list[Pending] = []
        self.times = {k: 0.0 for k in ("allreduce", "iallreduce_start", "iallreduce_wait",
                                        "scalars", "exchange")}
        self.halo_rows = 0
        self.sent_rows = 0

    def owned(self) -> np.ndarray:
        """The ids this rank owns."""
        return np.arange(self.starts[self.rank], self.starts[self.rank + 1])

    # ---- reductions ----------------------------------------------------------------------
    def _layout(self, tree: Tree | None, channel: str) -> TreeLayout | None:
        sig = TreeLayout.signature(tree) if tree else None
        layout = self._layouts.get(channel)
        if layout is None:
            known = [s for s in self.comm.allgather(sig) if s is not None]
            if not known:
                return None
            if any(s != known[0] for s in known):
                raise RuntimeError(f"allreduce[{channel}]: payload keys/shapes/dtypes differ across ranks")
            layout = self._layouts[channel] = TreeLayout(known[0])
        elif sig is not None and sig != layout.sig:
            raise RuntimeError(f"allreduce[{channel}]: payload structure changed from {layout.sig} to {sig}")
        return layout

    def allreduce(self, tree: Tree | None, channel: str = "default") -> Tree:
        """Sum of `tree` over all ranks; a rank may pass None (it contributes zeros).

        Returns {} only when every rank passed None before any structure was known.
        """
        from mpi4py import MPI

        t0 = time.perf_counter()
        layout = self._layout(tree, channel)
        if layout is None:
            return {}
        bufs = layout.pack(tree) if tree else layout.zeros()
        outs = {dt: np.empty_like(b) for dt, b in bufs.items()}
        for dt, b in bufs.items():
            self.comm.Allreduce(b, outs[dt], op=MPI.SUM)
        res = layout.unpack(outs, self.device)
        self.times["allreduce"] += time.perf_counter() - t0
        return res

    def iallreduce(self, tree: Tree | None, channel: str = "default") -> Pending | Ready:
        """Start a non-blocking sum of `tree` over all ranks; `.wait()` returns it."""
        from mpi4py import MPI

        t0 = time.perf_counter()
        layout = self._layout(tree, channel)
        if layout is None:
            return Ready({})
        bufs = layout.pack(tree) if tree else layout.zeros()
        outs = {dt: np.empty_like(b) for dt, b in bufs.items()}
        reqs = [self.comm.Iallreduce(b, outs[dt], op=MPI.SUM) for dt, b in bufs.items()]
        self.times["iallreduce_start"] += time.perf_counter() - t0
        pending = Pending(self, reqs, outs, layout, bufs)
        self._inflight = [p for p in self._inflight if p.done is None] + [pending]
        return pending

    def progress(self) -> None:
        """Test every reduction in flight (lets the MPI library progress them)."""
        for p in self._inflight:
            p.test()

    def _allreduce_float64(self, values: torch.Tensor, op: str) -> torch.Tensor:
        from mpi4py import MPI

        t0 = time.perf_counter()
        buf = values.detach().to("cpu", torch.float64).contiguous().numpy()
        out = np.empty_like(buf)
        self.comm.Allreduce(buf, out, op=getattr(MPI, op))
        self.times["scalars"] += time.perf_counter() - t0
        return torch.from_numpy(out).to(values.dtype)

    def allreduce_scalars(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (float64 on the wire)."""
        return self._allreduce_float64(values, "SUM")

    def allreduce_max(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over ranks (float64 on the wire)."""
        return self._allreduce_float64(values, "MAX")

    def allgather(self, obj: Any) -> list[Any]:
        """Small Python objects from every rank (end-of-run statistics)."""
        return list(self.comm.allgather(obj))

    # ---- gossip --------------------------------------------------------------------------
    def plan(self, mixing: dict[str, torch.Tensor], names: list[str]) -> MixPlan:
        """The exchange plan of these operators (recomputed only when the matrices change)."""
        key = tuple((n, id(mixing[n])) for n in names)
        if self._plan is None or self._plan[0] != key:
            mats = {n: mixing[n] for n in names}  # kept alive with the plan: ids stay unique
            self._plan = (key, MixPlan(mats, self.starts, self.rank, self.device), mats)
        return self._plan[1]

    def mix(self, mixing: dict[str, torch.Tensor], payload: Tree, owned: torch.Tensor,
            ops: Mapping[str, str]) -> Tree:
        """Rows `owned` of (M_k @ payload[k]); payload rows are this rank's nodes, in order."""
        plan = self.plan(mixing, sorted({ops.get(k, "W") for k in payload}))
        t0 = time.perf_counter()
        flat = {k: v.reshape(v.shape[0], -1) for k, v in payload.items()}
        halo = self._exchange(plan, flat)
        self.times["exchange"] += time.perf_counter() - t0
        out = {}
        for k, v in payload.items():
            ext = torch.cat([flat[k], halo[k]]) if plan.halo_rows else flat[k]
            out[k] = sparse_mix(plan.ops[ops.get(k, "W")], ext).reshape(v.shape)
        return out

    def _exchange(self, plan: MixPlan, flat: Tree) -> Tree:
        """Send boundary rows to the ranks that read them; return the received halo rows."""
        from mpi4py import MPI

        keys = list(flat)
        width = {k: flat[k].shape[1] * flat[k].element_size() for k in keys}
        row_bytes = sum(width.values())
        recv = {q: np.empty(h * row_bytes, dtype=np.uint8) for q, h in plan.recv.items()}
        reqs = [self.comm.Irecv(buf, source=q, tag=7) for q, buf in recv.items()]
        sends = {}
        for q, idx in plan.send.items():
            parts = [flat[k][idx].contiguous().view(torch.uint8).reshape(-1) for k in keys]
            sends[q] = torch.cat(parts).cpu().numpy()
            reqs.append(self.comm.Isend(sends[q], dest=q, tag=7))
            self.sent_rows += len(idx)
        MPI.Request.Waitall(reqs)
        self.halo_rows += plan.halo_rows
        halo: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for q, buf in recv.items():
            h, off = plan.recv[q], 0
            for k in keys:
                nb = h * width[k]
                arr = buf[off:off + nb].copy().view(_np_dtype(flat[k].dtype))
                halo[k].append(torch.from_numpy(arr).reshape(h, flat[k].shape[1]))
                off += nb
        return {k: (torch.cat(v).to(flat[k].device) if v else flat[k][:0]) for k, v in halo.items()}
