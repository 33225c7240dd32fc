"""MPI transport for the round loop (`fedsim.engines.mpi`): the `fedsim.comm.LocalComm` interface
over mpi4py.

* `allreduce(tree)`: every key packed into one contiguous flat buffer per dtype, one `Allreduce`.
  A rank none of whose clients took part passes None and joins with zeros: the key/shape/dtype
  signature is agreed once per channel (one small allgather the first time), then cached.
* `iallreduce(tree)`: the same with a non-blocking `Iallreduce`; `.wait()` on the returned handle
  gives the sum (CO2's one-step-stale outer average overlaps the next round's local steps).
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
from typing import Any

import numpy as np
import torch

from fedsim.types import Tree


def block_starts(n: int, size: int) -> np.ndarray:
    """[size + 1] first id of each rank's block: rank r owns [starts[r], starts[r+1])."""
    return np.array([n * r // size for r in range(size + 1)], dtype=np.int64)


def _np_dtype(dt: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dt).numpy().dtype


class TreeLayout:
    """Where each key of a tree lives in one flat buffer per dtype."""

    def __init__(self, sig: tuple[tuple[str, tuple[int, ...], str], ...]) -> None:
        self.sig = sig
        self.slots: dict[str, tuple[str, int, int, tuple[int, ...]]] = {}
        self.sizes: dict[str, int] = {}
        for key, shape, dt in sig:
            off = self.sizes.get(dt, 0)
            n = int(np.prod(shape)) if shape else 1
            self.slots[key] = (dt, off, n, shape)
            self.sizes[dt] = off + n

    @staticmethod
    def signature(tree: Tree) -> tuple[tuple[str, tuple[int, ...], str], ...]:
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
    """A reduction in flight; `wait()` returns the summed tree."""

    def __init__(self, comm: "MPIComm | None", reqs: list, outs: dict[str, np.ndarray],
                 layout: TreeLayout | None, keep: Any = None, done: Tree | None = None) -> None:
        self.comm, self.reqs, self.outs, self.layout = comm, reqs, outs, layout
        self.keep, self.done = keep, done  # keep: send buffers alive until the reduction completes

    def test(self) -> None:
        """Let the MPI library progress the reduction (called between local steps)."""
        if self.done is None and self.reqs:
            from mpi4py import MPI

            MPI.Request.Testall(self.reqs)

    def wait(self) -> Tree:
        if self.done is None:
            from mpi4py import MPI

            t0 = time.perf_counter()
            MPI.Request.Waitall(self.reqs)
            self.comm.times["iallreduce_wait"] += time.perf_counter() - t0
            self.done = self.layout.unpack(self.outs, self.comm.device)
            self.keep = None
        return self.done


def ready(tree: Tree) -> Pending:
    """An already-complete reduction (nothing to wait for)."""
    return Pending(None, [], {}, None, done=tree)


class _MixPlan:
    """Who sends which rows to whom, and this rank's rows of each operator over [own; halo]."""

    def __init__(self, mats: dict[str, torch.Tensor], starts: np.ndarray, rank: int,
                 device: torch.device) -> None:
        lo, hi = int(starts[rank]), int(starts[rank + 1])
        n = int(starts[-1])
        csr = {name: (m if m.layout == torch.sparse_csr else m.to_sparse_csr()) for name, m in mats.items()}
        rows_all, cols_all = [], []
        for m in csr.values():
            crow = m.crow_indices().cpu().numpy()
            rows_all.append(np.repeat(np.arange(n), np.diff(crow)))
            cols_all.append(m.col_indices().cpu().numpy())
        rows, cols = np.concatenate(rows_all), np.concatenate(cols_all)
        owner_r = np.searchsorted(starts, rows, side="right") - 1
        owner_c = np.searchsorted(starts, cols, side="right") - 1
        # rows other ranks read from me: pairs (reader rank, my column), unique and sorted
        out = np.unique(owner_r[(owner_c == rank) & (owner_r != rank)] * n
                        + cols[(owner_c == rank) & (owner_r != rank)])
        self.send = {int(q): torch.as_tensor(out[out // n == q] % n - lo, device=device)
                     for q in np.unique(out // n)}
        halo = np.unique(cols[(owner_r == rank) & (owner_c != rank)])
        halo_owner = np.searchsorted(starts, halo, side="right") - 1
        self.recv = {int(q): int((halo_owner == q).sum()) for q in np.unique(halo_owner)}
        self.halo_rows = len(halo)
        m_own = hi - lo
        self.ops: dict[str, torch.Tensor] = {}
        for name, m in csr.items():
            crow = m.crow_indices().cpu().numpy()
            a, b = int(crow[lo]), int(crow[hi])
            c = m.col_indices().cpu().numpy()[a:b]
            own = (c >= lo) & (c < hi)
            ext = np.where(own, c - lo, m_own + np.searchsorted(halo, c))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse")
                self.ops[name] = torch.sparse_csr_tensor(
                    torch.as_tensor(crow[lo:hi + 1] - a), torch.as_tensor(ext),
                    m.values()[a:b].cpu(), size=(m_own, m_own + len(halo))).to(device)


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
        self._layouts: dict[str, TreeLayout | None] = {}
        self._plan: tuple[tuple, _MixPlan, dict] | None = None
        self.times = {k: 0.0 for k in ("allreduce", "iallreduce_start", "iallreduce_wait",
                                        "scalars", "exchange")}
        self.halo_rows = 0
        self.sent_rows = 0

    def owned(self) -> np.ndarray:
        """The ids this rank owns."""
        return np.arange(self.starts[self.rank], self.starts[self.rank + 1])

    def comm_seconds(self) -> float:
        return sum(self.times.values())

    # ---- reductions ----------------------------------------------------------------------
    def _layout(self, tree: Tree | None, channel: str) -> TreeLayout | None:
        sig = TreeLayout.signature(tree) if tree else None
        layout = self._layouts.get(channel)
        if layout is None:
            sigs = self.comm.allgather(sig)
            known = [s for s in sigs if s is not None]
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

    def iallreduce(self, tree: Tree | None, channel: str = "default") -> Pending:
        """Start a non-blocking sum of `tree` over all ranks; `.wait()` returns it."""
        from mpi4py import MPI

        t0 = time.perf_counter()
        layout = self._layout(tree, channel)
        if layout is None:
            return ready({})
        bufs = layout.pack(tree) if tree else layout.zeros()
        outs = {dt: np.empty_like(b) for dt, b in bufs.items()}
        reqs = [self.comm.Iallreduce(b, outs[dt], op=MPI.SUM) for dt, b in bufs.items()]
        self.times["iallreduce_start"] += time.perf_counter() - t0
        return Pending(self, reqs, outs, layout, keep=bufs)

    def allreduce_scalars(self, values: torch.Tensor) -> torch.Tensor:
        from mpi4py import MPI

        t0 = time.perf_counter()
        buf = values.detach().to("cpu", torch.float64).contiguous().numpy()
        out = np.empty_like(buf)
        self.comm.Allreduce(buf, out, op=MPI.SUM)
        self.times["scalars"] += time.perf_counter() - t0
        return torch.from_numpy(out).to(values.dtype)

    def allgather(self, obj: Any) -> list[Any]:
        """Small Python objects from every rank (end-of-run statistics)."""
        return self.comm.allgather(obj)

    # ---- gossip --------------------------------------------------------------------------
    def plan(self, mixing: dict[str, torch.Tensor], names: list[str]) -> _MixPlan:
        """The exchange plan of these operators (recomputed only when the matrices change)."""
        key = tuple((n, id(mixing[n])) for n in names)
        if self._plan is None or self._plan[0] != key:
            mats = {n: mixing[n] for n in names}  # kept alive with the plan: ids stay unique
            self._plan = (key, _MixPlan(mats, self.starts, self.rank, self.device), mats)
        return self._plan[1]

    def mix(self, mixing: dict[str, torch.Tensor], payload: Tree, owned: torch.Tensor,
            ops: dict[str, str]) -> Tree:
        """Rows `owned` of (M_k @ payload[k]); payload rows are this rank's nodes, in order."""
        names = sorted({ops.get(k, "W") for k in payload})
        plan = self.plan(mixing, names)
        t0 = time.perf_counter()
        flat = {k: v.reshape(v.shape[0], -1) for k, v in payload.items()}
        halo = self._exchange(plan, flat)
        self.times["exchange"] += time.perf_counter() - t0
        out = {}
        for k, v in payload.items():
            ext = torch.cat([flat[k], halo[k]]) if plan.halo_rows else flat[k]
            out[k] = torch.sparse.mm(plan.ops[ops.get(k, "W")], ext).reshape(v.shape)
        return out

    def _exchange(self, plan: _MixPlan, flat: Tree) -> Tree:
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
