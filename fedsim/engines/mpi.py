"""MPI engine: the same scenario on K processes (and nodes), `mpiexec -n K fedsim run X --engine mpi`.

Every rank builds the whole scenario from the seed (data is generated in-process, nothing is
broadcast), then owns a fixed, balanced, contiguous slice of the clients (FL) or nodes (gossip):
rank r of K owns ids [N*r//K, N*(r+1)//K), holds only their data and their per-client state, and
runs the same round loop as the default engine (`fedsim.engines.loop.RoundLoop`) over its slice.
Only the transport differs (`fedsim.comm.mpi.MPIComm`):
  * FL: the weighted partial sums of a round, all keys in one flat buffer, one Allreduce. The
    server state is replicated: every rank applies the same update to the same sum.
  * staleness 1 (CO2, Sun et al. 2024, arXiv 2401.16265): round t's sum starts as a non-blocking
    Iallreduce right after local(t) and is waited for only at the server update of round t+1, so
    it overlaps round t+1's local steps (every gradient call lets MPI progress it); the result
    equals the in-process FIFO.
  * gossip: neighbour exchange of boundary rows along the mixing matrix (point-to-point).
Rank 0 evaluates, writes the run folder and shows the progress bar. An exception on any rank
prints ``error: rank R: ...`` and aborts the whole job (non-zero exit, never a hang). mpi4py is
imported only when this engine is built (the registry imports this module for every run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
import traceback
from typing import Any

import numpy as np
import torch

from fedsim.checkpoint import Control, Interrupted
from fedsim.constraints import PositiveInt
from fedsim.engines import ENGINES
from fedsim.engines.loop import RoundLoop
from fedsim.errors import ConfigError
from fedsim.setup import Setup
from fedsim.types import OnEval, Progress, Tree


def model_fingerprint(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[3] float64 (sum, sum of w*x, sum of x^2) of models `rows` [m, P] with global ids [m].

    w_ij = cos(0.7 i + 0.013 j) is a fixed pseudo-random probe, so sums over the rows of
    different ranks add up to the fingerprint of the whole population (within float tolerance).
    """
    x = rows.detach().double().cpu()
    j = torch.arange(x.shape[1], dtype=torch.float64)
    w = torch.cos(0.7 * ids.cpu().double()[:, None] + 0.013 * j[None, :])
    return torch.stack([x.sum(), (w * x).sum(), (x * x).sum()])


def _tree_digest(tree: Tree) -> str:
    h = hashlib.sha256()
    for k in sorted(tree):
        h.update(k.encode())
        h.update(tree[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _local_rank() -> int:
    for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "PMI_LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _rank_device(device: torch.device) -> torch.device:
    """`cuda` without an index: one GPU per local rank, round robin."""
    if device.type == "cuda" and device.index is None:
        dev = torch.device("cuda", _local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return device


def slice_setup(setup: Setup, owned: np.ndarray, device: torch.device | None = None) -> Setup:
    """`setup` whose problem holds only the data of clients `owned` (others get empty parts)."""
    lo, hi = int(owned[0]), int(owned[-1]) + 1
    parts = [p if lo <= i < hi else p[:0] for i, p in enumerate(setup.parts)]
    dev = device or setup.device
    return dataclasses.replace(setup, parts=parts, device=dev, x0=setup.x0.to(dev))


class MPIEngine:
    """See the module docstring. `is_root` is True on rank 0 only."""

    name = "mpi"

    def __init__(self, chunk_size: int | None, memory_mb: int, threads: int,
                 check_replicas: bool) -> None:
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ConfigError(f"the mpi engine needs mpi4py ({exc})", key="engine.kind", value="mpi",
                              allowed='multiplex, or install the extra: pip install -e ".[mpi]"') from None
        self.world = MPI.COMM_WORLD
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        self.is_root = self.rank == 0
        self.chunk_size, self.memory_mb, self.threads = chunk_size, memory_mb, threads
        self.check_replicas = check_replicas
        self.extra: dict[str, Any] = {}
        self.loop: RoundLoop | None = None

    def prepare(self, setup: Setup) -> None:
        """Check the layout (before any run folder exists); each rank builds its slice in `run`."""
        self._check(setup)

    def _check(self, setup: Setup) -> None:
        if self.size > setup.num_clients:
            raise ConfigError("more MPI ranks than clients/nodes", key="data.clients",
                              value=setup.num_clients, allowed=f">= the number of ranks ({self.size})")

    def run(self, setup: Setup, on_eval: OnEval, progress: Progress | None = None,
            control: Control | None = None) -> list[dict[str, Any]]:
        try:
            loop = self.build(setup, on_eval)
        except ConfigError:
            raise                          # same on every rank, before any communication: exit 2
        except BaseException as exc:
            self.abort(exc)
            raise
        try:
            t0 = time.perf_counter()
            if control is not None:  # rank 0 created the run folder: every rank writes into it
                control.folder = self.world.bcast(control.folder, root=0)
            history = loop.run(progress, control)
            self.extra = self.report(loop, time.perf_counter() - t0)
            return history
        except (Interrupted, ConfigError):
            raise                          # every rank stops at the same round (or checkpoint)
        except BaseException as exc:
            self.abort(exc)
            raise

    def build(self, setup: Setup, on_eval: OnEval) -> RoundLoop:
        """Validate (no communication), then this rank's loop over its slice."""
        from fedsim.comm.mpi import MPIComm, block_starts

        n = setup.num_clients
        self._check(setup)
        torch.set_num_threads(self.threads)
        starts = block_starts(n, self.size)
        owned = np.arange(starts[self.rank], starts[self.rank + 1])
        sl = slice_setup(setup, owned, _rank_device(setup.device))
        comm = MPIComm(self.world.Dup(), n, sl.device)
        loop = RoundLoop.from_setup(sl, memory_mb=self.memory_mb, chunk_size=self.chunk_size,
                                    on_eval=on_eval if self.is_root else None, comm=comm,
                                    owned=owned)
        self.loop = loop
        return loop

    def report(self, loop: RoundLoop, loop_s: float) -> dict[str, Any]:
        """End-of-run statistics (collectives on every rank; the values land in summary.json)."""
        from fedsim.comm.mpi import MPIComm

        strat, s, comm = loop.strategy, loop.state, loop.comm
        assert isinstance(comm, MPIComm)
        if strat.comm == "reduce":
            fp = model_fingerprint(s.server[strat.model_key][None], torch.zeros(1, dtype=torch.int64))
        else:
            ids, rows = loop.node_rows()
            fp = comm.allreduce_scalars(model_fingerprint(rows, ids))
        mine = {"times": dict(comm.times), "loop_s": loop_s, "clients": len(loop.owned),
                "data_rows": int(loop.problem.data.x.shape[0]) if hasattr(loop.problem, "data") else None,
                "halo_rows": comm.halo_rows, "state_rows": s.store.used,
                "digest": _tree_digest(s.server) if self.check_replicas else None}
        everyone: list[dict[str, Any]] = comm.allgather(mine)
        comm_s = [sum(r["times"].values()) for r in everyone]
        share = [c / max(r["loop_s"], 1e-12) for c, r in zip(comm_s, everyone, strict=True)]
        by_kind = {k: round(max(r["times"][k] for r in everyone), 4) for k in comm.times}
        rounds = max(loop.rounds, 1)
        out = {"ranks": self.size, "layout": "block", "threads_per_rank": self.threads,
               "clients_per_rank": [r["clients"] for r in everyone],
               "data_rows_per_rank": [r["data_rows"] for r in everyone],
               "state_rows_per_rank": [r["state_rows"] for r in everyone],
               "model_fingerprint": [float(v) for v in fp],
               "comm_share_mean": round(float(np.mean(share)), 4),
               "comm_share_max": round(float(np.max(share)), 4),
               "comm_s_by_kind_max": by_kind,
               "halo_rows_per_round": [r["halo_rows"] / rounds for r in everyone]}
        if self.check_replicas:
            out["replicas_identical"] = len({r["digest"] for r in everyone}) == 1
        return {"mpi": out, "sim": loop.clock.summary()}

    def summary_extra(self) -> dict[str, Any]:
        return dict(self.extra)

    def abort(self, exc: BaseException) -> None:
        """One line on stderr naming the rank, then bring the whole job down (Abort).

        A single rank has nobody to wait for: it returns and the caller re-raises, so the run
        folder gets its "failed" summary as with the multiplex engine.
        """
        if self.size == 1:
            return
        if os.environ.get("FEDSIM_DEBUG"):
            traceback.print_exc()
        print(f"error: rank {self.rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        self.world.Abort(1)


@ENGINES.register("mpi")
def mpi(*, chunk_size: PositiveInt | None = None,
        memory_mb: PositiveInt = 2048,
        threads: PositiveInt = 1,
        check_replicas: bool = True) -> MPIEngine:
    """K MPI ranks (mpiexec -n K), each training a contiguous slice of the clients multiplexed.

    Rank r of K owns the balanced contiguous block [N*r//K, N*(r+1)//K) of client ids.

    Args:
      chunk_size: clients per stacked computation on a rank; None picks it from `memory_mb`.
      memory_mb: memory bound for one chunk's working set when chunk_size is None.
      threads: torch intra-op threads per rank (default 1: one rank per core).
      check_replicas: hash the replicated server state on every rank at the end and report
        whether all ranks agree (summary.json: mpi.replicas_identical).
    """
    return MPIEngine(chunk_size, memory_mb, threads, check_replicas)
