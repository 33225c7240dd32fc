"""The round loop shared by the in-process (multiplex) and MPI engines.

One process owns a set of clients (all of them in-process; a fixed slice on an MPI rank) and
trains the participants among them in memory-bounded chunks, each chunk one stacked
computation. Reductions are sums (a monoid), so chunking and rank layout change only the
floating-point summation order, never the algorithm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from fedsim.comm import ByteCounter, LocalComm, add_into, tree_bytes, weighted_sum
from fedsim.problem import Problem
from fedsim.setup import Setup
from fedsim.store import ClientStore
from fedsim.types import RoundCtx, Strategy, Tree


def auto_chunk(problem: Problem, memory_mb: int) -> int:
    """Clients per stacked computation so that one chunk's working set stays within `memory_mb`."""
    per_client = problem.memory_per_client() if hasattr(problem, "memory_per_client") else 1
    return max(1, int(memory_mb * 2**20 // max(per_client, 1)))


@dataclass
class LoopState:
    server: Tree
    store: ClientStore
    bytes: ByteCounter = field(default_factory=ByteCounter)
    fifo: list[Tree] = field(default_factory=list)
    round: int = 0


class _Full:
    def __init__(self, n: int) -> None:
        self.n = n

    def mask(self, t: int) -> np.ndarray:
        return np.ones(self.n, dtype=bool)


class RoundLoop:
    """Runs the rounds of one strategy on one problem for the clients this process owns.

    Args:
      strategy: the algorithm. problem: data + gradients + evaluation (`fedsim.problem`).
      x0: [P] initial global model. rounds, seed: as in the scenario.
      participation: object with `mask(round) -> bool [N]` (None: everyone, every round).
      topology: object with `.static` and `.mixing(round, rule)` (gossip strategies).
      x0_of: ids -> initial model of those clients, [P] or [m, P] (default: x0).
      comm: LocalComm (default) or an MPI comm. owned: client ids this process trains.
      chunk_size: max clients per stacked computation (None: all at once).
      on_eval: called with the metrics dict after each evaluation.
    """

    def __init__(self, strategy: Strategy, problem: Problem, x0: torch.Tensor, *, rounds: int,
                 seed: int, participation: Any = None, topology: Any = None,
                 mixing_rule: str = "metropolis", eval_every: int = 1,
                 x0_of: Callable[[torch.Tensor], torch.Tensor] | None = None, comm: Any = None,
                 owned: np.ndarray | None = None, chunk_size: int | None = None,
                 on_eval: Callable[[dict], None] | None = None) -> None:
        n = problem.num_clients
        self.strategy, self.rounds, self.seed, self.eval_every = strategy, rounds, seed, eval_every
        self.participation = participation or _Full(n)
        self.topology, self.mixing_rule = topology, mixing_rule
        self.comm = comm or LocalComm()
        self.owned = np.arange(n) if owned is None else np.asarray(owned)
        self.problem = problem.restrict(self.owned)
        self.num_clients, self.device, self.dtype = n, problem.device, problem.dtype
        self.chunk = chunk_size or n
        self.on_eval = on_eval or (lambda m: None)
        self.sizes = torch.as_tensor(problem.sizes, device=self.device)
        x0 = x0.to(self.device, self.dtype)
        self.state = LoopState(strategy.init_server(x0),
                               ClientStore(strategy.init_clients, x0_of or (lambda ids: x0), n,
                                           self.device))
        self.mixing: dict[str, torch.Tensor] = {}
        self._mixing_round: int | None = None
        self.t0 = time.perf_counter()
        self.train_loss = (0.0, 0)

    @classmethod
    def from_setup(cls, setup: Setup, memory_mb: int | None = None, **kw: Any) -> "RoundLoop":
        """The loop of a scenario built by `fedsim.setup.build_setup`.

        With `memory_mb` and no `chunk_size`, the chunk size is derived from the memory bound.
        `plan` / `plan_block` choose the execution plan (`fedsim.plan.choose_plan`).
        """
        sc = setup.scenario
        problem = setup.problem()
        plan, plan_block = kw.pop("plan", "auto"), kw.pop("plan_block", None)
        if hasattr(problem, "choose_plan"):
            problem.choose_plan(plan, plan_block, memory_mb or 2048)
        if kw.get("chunk_size") is None and memory_mb:
            kw["chunk_size"] = auto_chunk(problem, memory_mb)
        return cls(setup.strategy, problem, setup.x0, rounds=sc.rounds, seed=sc.seed,
                   participation=setup.participation, topology=setup.topology,
                   mixing_rule=sc.topology.mixing, eval_every=sc.eval.every,
                   x0_of=setup.initial_models, **kw)

    # ---- one round -----------------------------------------------------------------------
    def participants(self, t: int) -> np.ndarray:
        if self.strategy.comm == "mix":
            return np.ones(self.num_clients, dtype=bool)
        return np.asarray(self.participation.mask(t), dtype=bool)

    def ctx(self, t: int, ids: torch.Tensor, mask: torch.Tensor, denom: torch.Tensor) -> RoundCtx:
        n_i = self.sizes[ids]
        return RoundCtx(round=t, seed=self.seed, ids=ids, num_samples=n_i,
                        weight=n_i.to(self.dtype) / denom, participants=mask,
                        total_samples=self.sizes, num_clients=self.num_clients)

    def step(self, t: int) -> None:
        s, strat, dev = self.state, self.strategy, self.device
        mask_np = self.participants(t)
        mask = torch.as_tensor(mask_np, device=dev)
        denom = self.sizes[mask].sum().to(self.dtype).clamp_min(1)
        mine = torch.as_tensor(self.owned[mask_np[self.owned]], device=dev)
        partial: Tree | None = None
        payload_rows: list[Tree] = []
        up = down = 0
        loss_sum, loss_n = 0.0, 0
        down_per = tree_bytes({k: s.server[k][None] for k in strat.broadcast if k in s.server},
                              rows=False)
        for c in range(0, mine.numel(), self.chunk):
            ids = mine[c:c + self.chunk]
            ctx = self.ctx(t, ids, mask, denom)
            clients = s.store.gather(ids)
            oracle = self.problem.oracle(ids, t)
            payload, clients, info = strat.local(s.server, clients, oracle, ctx)
            s.store.scatter(ids, clients)
            if "loss" in info:
                loss_sum += float(info["loss"].double().sum())
                loss_n += ids.numel()
            bits = info.get("up_bits")
            up_rows = (bits.double() / 8).ceil() if bits is not None else tree_bytes(payload)
            if strat.comm == "reduce":
                w = strat.weights(s.server, ctx) if strat.weights else ctx.weight
                partial = add_into(partial, weighted_sum(payload, w))
                up += int(up_rows.sum())
                down += int(down_per) * ids.numel()
            else:
                payload_rows.append(payload)
                deg = self.degrees(t)[ids]
                up += int((up_rows * deg).sum())
        self.train_loss = (self.train_loss[0] + loss_sum, self.train_loss[1] + loss_n)
        if strat.comm == "reduce":
            self.finish_reduce(t, partial, mask, denom)
        else:
            self.finish_mix(t, payload_rows, mine, mask, denom)
            down = up
        self.count_bytes(up, down)
        s.round = t + 1

    def count_bytes(self, up: int, down: int) -> None:
        """Add this round's bytes (this process's clients) to the totals over all processes."""
        v = self.comm.allreduce_scalars(torch.tensor([up, down], dtype=torch.float64))
        self.state.bytes.add(int(v[0]), int(v[1]))

    def finish_reduce(self, t: int, partial: Tree | None, mask: torch.Tensor, denom: torch.Tensor) -> None:
        s, strat = self.state, self.strategy
        reduced = self.comm.allreduce(partial) if self.comm.size > 1 else (partial or {})
        if strat.staleness:
            s.fifo.append(reduced)
            if len(s.fifo) <= strat.staleness:
                return
            reduced = s.fifo.pop(0)
        all_ids = torch.nonzero(mask).flatten()
        s.server = strat.server_update(s.server, reduced, self.ctx(t, all_ids, mask, denom))

    def finish_mix(self, t: int, payload_rows: list[Tree], mine: torch.Tensor, mask: torch.Tensor,
                   denom: torch.Tensor) -> None:
        s, strat = self.state, self.strategy
        payload = {k: torch.cat([p[k] for p in payload_rows]) for k in payload_rows[0]}
        mixed = self.comm.mix(self.mixing_ops(t), payload, mine, dict(strat.mixing))
        for c in range(0, mine.numel(), self.chunk):
            ids = mine[c:c + self.chunk]
            rows = {k: v[c:c + self.chunk] for k, v in mixed.items()}
            clients = strat.node_update(s.store.gather(ids), rows, self.ctx(t, ids, mask, denom))
            s.store.scatter(ids, clients)

    def mixing_ops(self, t: int) -> dict[str, torch.Tensor]:
        topo = self.topology
        key = 0 if topo.static else t
        if self._mixing_round != key:
            mm = topo.mixing(t, rule=self.mixing_rule)
            self.mixing = {"W": mm.to_torch(self.device, self.dtype),
                           "mean": _neighbour_mean(mm, self.device, self.dtype)}
            self._degrees = torch.as_tensor(np.diff(mm.indptr), device=self.device) - 1
            self._mixing_round = key
        return self.mixing

    def degrees(self, t: int) -> torch.Tensor:
        self.mixing_ops(t)
        return self._degrees

    # ---- evaluation ----------------------------------------------------------------------
    def models_for_eval(self) -> torch.Tensor:
        """The global model [P] (reduce) or the average node model (mix)."""
        s, strat = self.state, self.strategy
        if strat.comm == "reduce":
            return s.server[strat.model_key]
        ids = torch.as_tensor(self.owned, device=self.device)
        total = s.store.gather(ids)[strat.model_key].sum(0)
        return self.comm.allreduce({"x": total})["x"] / self.num_clients

    def evaluate(self, t: int) -> dict[str, Any]:
        s, strat = self.state, self.strategy
        x = self.models_for_eval()
        res = self.problem.evaluate(x[None])
        tl = self.comm.allreduce_scalars(torch.tensor(self.train_loss, dtype=torch.float64))
        self.train_loss = (0.0, 0)
        m = eval_metrics(t, tl, res, s.bytes)
        if strat.comm == "mix":
            m.update(self.node_metrics(x))
        m["wall_s"] = round(time.perf_counter() - self.t0, 4)
        return m

    def node_metrics(self, avg: torch.Tensor) -> dict[str, float]:
        """Consensus distance (mean squared distance to the average model) and node accuracy."""
        s, strat = self.state, self.strategy
        sq = torch.zeros(2, dtype=torch.float64, device=self.device)
        ids_all = torch.as_tensor(self.owned, device=self.device)
        for c in range(0, ids_all.numel(), self.chunk):
            xs = s.store.gather(ids_all[c:c + self.chunk])[strat.model_key]
            res = self.problem.evaluate(xs)
            sq[0] += ((xs - avg) ** 2).sum().double()
            sq[1] += res[1].sum() if res and res[1] is not None else 0.0
        tot = self.comm.allreduce_scalars(sq.cpu())
        n = self.num_clients
        return {"consensus_distance": float(tot[0] / n), "node_accuracy_mean": float(tot[1] / n)}

    def run(self, progress: Callable[[int, dict | None], None] | None = None) -> list[dict]:
        if self.state.round == 0:
            self.t0 = time.perf_counter()  # metrics' wall_s counts rounds, not construction
        history = []
        for t in range(self.state.round, self.rounds):
            self.step(t)
            m = None
            if (t + 1) % self.eval_every == 0 or t + 1 == self.rounds:
                m = self.evaluate(t)
                history.append(m)
                self.on_eval(m)
            if progress:
                progress(t, m)
        return history


def eval_metrics(t: int, train_loss: torch.Tensor, res: Any, counter: ByteCounter) -> dict[str, Any]:
    """The metrics line every engine writes: round, train/test loss and accuracy, bytes.

    `train_loss` is (sum, count) over the participants since the last evaluation; `res` is
    `problem.evaluate(x[None])` of the evaluated model (or None).
    """
    total, count = float(train_loss[0]), float(train_loss[1])
    return {"round": t + 1,
            "train_loss": total / count if count > 0 else None,
            "test_loss": float(res[0][0]) if res else None,
            "test_accuracy": float(res[1][0]) if res and res[1] is not None else None,
            "bytes_up": counter.up, "bytes_down": counter.down}


def _neighbour_mean(mm: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sparse [n, n]: row i averages the in-neighbours of i uniformly (self excluded)."""
    indptr, indices = np.asarray(mm.indptr), np.asarray(mm.indices)
    rows = np.repeat(np.arange(mm.n), np.diff(indptr))
    keep = indices != rows
    r, c = rows[keep], indices[keep]
    deg = np.bincount(r, minlength=mm.n).astype(np.float64)
    vals = 1.0 / np.maximum(deg[r], 1)
    coo = torch.sparse_coo_tensor(torch.as_tensor(np.stack([r, c])), torch.as_tensor(vals),
                                  (mm.n, mm.n))
    return coo.coalesce().to_sparse_csr().to(device=device, dtype=dtype)
