"""The round loop of the in-process (multiplex) and MPI engines: a scheduler of client blocks.

One process owns a set of clients (all of them in-process; a fixed slice on an MPI rank) and
trains the participants among them in memory-bounded chunks, each chunk one stacked
computation. What a round means comes from the round kernel (`fedsim.round`); how sums travel
from the `Comm` (`fedsim.comm.LocalComm` here, `fedsim.comm.mpi.MPIComm` on ranks). Reductions
are sums (a monoid), so chunking and rank layout change only the floating-point summation
order, never the algorithm.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsim import checkpoint as ckpt
from fedsim import round as kernel
from fedsim.comm import LocalComm, Ready, add_into
from fedsim.config_system import SystemCfg
from fedsim.engines.async_loop import AsyncRounds
from fedsim.problem import Problem
from fedsim.setup import Setup
from fedsim.store import ClientStore
from fedsim.system import Clock, Plan, RoundRecord, SystemModel
from fedsim.types import Comm, OnEval, Participation, Progress, RoundCtx, Strategy, Topology, Tree
from fedsim.work import LocalWork


def auto_chunk(problem: Problem, memory_mb: int) -> int:
    """Clients per stacked computation so that one chunk's working set stays within `memory_mb`
    (and within the execution plan's `chunk_cap`, if it has one)."""
    per_client = problem.memory_per_client() if hasattr(problem, "memory_per_client") else 1
    chunk = max(1, int(memory_mb * 2**20 // max(per_client, 1)))
    cap = getattr(getattr(problem, "plan", None), "chunk_cap", None)
    return min(chunk, cap) if cap else chunk


@dataclass
class LoopState:
    """Everything that changes from round to round (what a checkpoint holds)."""

    server: Tree
    store: ClientStore
    stale: kernel.Staleness
    bytes: kernel.ByteCounter = field(default_factory=kernel.ByteCounter)
    round: int = 0


class RoundLoop:
    """Runs the rounds of one strategy on one problem for the clients this process owns.

    Args:
      strategy: the algorithm. problem: data + gradients + evaluation (`fedsim.problem`).
      x0: [P] initial global model. rounds, seed: as in the scenario.
      participation: who takes part each round (None: everyone, every round).
      topology: the gossip graph (gossip strategies). mixing_rule: its mixing rule.
      x0_of: ids -> initial model of those clients, [P] or [m, P] (default: x0).
      comm: the transport (default `LocalComm`: this process owns every client).
      owned: client ids this process trains (default: all).
      chunk_size: max clients per stacked computation (None: all at once).
      on_eval: called with the metrics line after each evaluation.
      work: heterogeneous local work (None: the strategy's own local steps).
      system: the simulated system (speeds, links, stragglers; None: the default profile); with
        `system.asynchrony` the rounds are FedBuff server updates (`fedsim.engines.async_loop`).

    Rank 0 of `comm` evaluates the global model on the test set; every rank takes part in the
    collectives of an evaluation (train loss, bytes, gossip metrics).
    """

    def __init__(self, strategy: Strategy, problem: Problem, x0: torch.Tensor, *, rounds: int,
                 seed: int, participation: Participation | None = None,
                 topology: Topology | None = None, mixing_rule: str = "metropolis",
                 eval_every: int = 1, x0_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 comm: Comm | None = None, owned: np.ndarray | None = None,
                 chunk_size: int | None = None, on_eval: OnEval | None = None,
                 work: LocalWork | None = None, system: SystemModel | None = None) -> None:
        n = problem.num_clients
        self.strategy, self.rounds, self.seed, self.eval_every = strategy, rounds, seed, eval_every
        self.participation, self.topology, self.work = participation, topology, work
        self.comm: Comm = comm or LocalComm()
        self.owned = np.arange(n) if owned is None else np.asarray(owned)
        self.problem = problem.restrict(self.owned)
        self.num_clients, self.device, self.dtype = n, problem.device, problem.dtype
        self.chunk = chunk_size or n
        self.on_eval = on_eval or (lambda m: None)
        self.sizes = torch.as_tensor(problem.sizes, device=self.device)
        self.sizes_np = np.asarray(problem.sizes)
        self.system = system or SystemModel(SystemCfg(), n, seed, problem.flops_per_sample)
        self.clock = Clock()
        self.mixing = (kernel.MixingOps(topology, mixing_rule, self.device, self.dtype)
                       if strategy.comm == "mix" and topology is not None else None)
        x0 = x0.to(self.device, self.dtype)
        store = ClientStore(strategy.init_clients, x0_of or (lambda ids: x0), n, self.device)
        self.state = LoopState(strategy.init_server(x0), store, kernel.Staleness(strategy.staleness))
        self.t0 = time.perf_counter()
        self.train_loss = [0.0, 0.0]
        self._round_bytes: list[tuple[int, int]] = []
        self._round_times: list[RoundRecord] = []
        self.stale_tail: list[Tree] = []
        self.asyn = AsyncRounds(self, self.system.cfg.asynchrony) if self.system.cfg.asynchrony else None

    @classmethod
    def from_setup(cls, setup: Setup, memory_mb: int | None = None, **kw: Any) -> RoundLoop:
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
                   x0_of=setup.initial_models, work=setup.work, system=setup.system, **kw)

    def _chunks(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [ids[c:c + self.chunk] for c in range(0, ids.numel(), self.chunk)]

    def _ctx(self, t: int, ids: torch.Tensor, mask: torch.Tensor, plan: Plan) -> RoundCtx:
        steps = kernel.block_steps(plan, self.work, self.strategy, t, ids)
        return kernel.make_ctx(t, self.seed, ids, mask, self.sizes, self.dtype, steps)

    # ---- one round -----------------------------------------------------------------------
    def step(self, t: int) -> None:
        if self.asyn is not None:  # FedBuff / FedAsync: the interval up to server update t
            self.asyn.step(t)
            return
        s, strat = self.state, self.strategy
        if kernel.clock_driven(self.participation):
            self.flush()  # an availability trace reads the clock at the round's start
        selected = kernel.participants(strat, self.participation, t, self.num_clients, self.clock)
        plan = kernel.plan_round(strat, self.system, self.work, t, selected, self.sizes_np,
                                 self.problem.batch_size, s.server, self.problem.num_params)
        mask_np = plan.mask
        mask = torch.as_tensor(mask_np, device=self.device)
        mine = torch.as_tensor(self.owned[mask_np[self.owned]], device=self.device)
        degrees = None
        if self.mixing is not None:
            self.mixing.at(t)
            degrees = self.mixing.degrees
        partial: Tree | None = None
        rows: list[Tree] = []
        up = 0
        times = RoundRecord()
        down_per = kernel.broadcast_bytes(strat, s.server) if strat.comm == "reduce" else 0
        progress = self.comm.progress if strat.staleness and self.comm.size > 1 else None
        for ids in self._chunks(mine):
            ctx = self._ctx(t, ids, mask, plan)
            out = kernel.client_step(strat, s.server, s.store.gather(ids), self.problem, ctx, progress)
            s.store.scatter(ids, out.clients)
            ids_np = ids.cpu().numpy()
            kernel.record_times(times, self.system, strat, t, ids_np, out.samples.cpu().numpy(),
                                out.up_bytes.cpu().numpy(), down_per,
                                None if degrees is None else degrees[ids].cpu().numpy())
            if out.loss is not None:
                self.train_loss[0] += float(out.loss.double().sum())
                self.train_loss[1] += ids.numel()
            if strat.comm == "reduce":
                if strat.aggregate is None:
                    partial = add_into(partial, kernel.block_partial(strat, s.server, out.payload, ctx))
                else:
                    rows.append(out.payload)
                up += int(out.up_bytes.sum())
            else:
                assert degrees is not None
                rows.append(out.payload)
                up += int((out.up_bytes * degrees[ids]).sum())
        if strat.comm == "reduce":
            down = down_per * mine.numel()
            if strat.aggregate is None:
                self._finish_reduce(t, partial, mask, plan)
            else:
                self._finish_gather(t, rows, mask, plan)
        else:
            down = up
            self._finish_mix(t, rows, mine, mask, plan)
        self._round_bytes.append((up, down))
        self._round_times.append(times)
        s.round = t + 1

    def _finish_reduce(self, t: int, partial: Tree | None, mask: torch.Tensor, plan: Plan) -> None:
        s, strat = self.state, self.strategy
        if not bool(mask.any()):                # nobody took part anywhere: no collective
            pending: Any = Ready({})
        elif strat.staleness:
            pending = self.comm.iallreduce(partial, channel="reduce")
        else:
            pending = Ready(self.comm.allreduce(partial, channel="reduce"))
        reduced = s.stale.push(pending)
        ctx = self._ctx(t, torch.nonzero(mask).flatten(), mask, plan)
        s.server = kernel.server_step(strat, s.server, reduced, ctx)

    def _finish_gather(self, t: int, rows: list[Tree], mask: torch.Tensor, plan: Plan) -> None:
        """A strategy with an `aggregate` (robust aggregation): every process gathers the rows
        of all participants (its own chunks, then every rank's in rank order = ascending ids)
        and computes the same reduction; no collective in a round nobody took part in."""
        s, strat = self.state, self.strategy
        ctx = self._ctx(t, torch.nonzero(mask).flatten(), mask, plan)
        gathered: Tree = {}
        if bool(mask.any()):
            mine = {k: torch.cat([r[k] for r in rows]) for k in rows[0]} if rows else None
            if self.comm.size == 1:
                parts = [mine] if mine else []
            else:  # pickled host copies, one object per rank
                host = None if mine is None else {k: v.cpu() for k, v in mine.items()}
                parts = [p for p in self.comm.allgather(host) if p]
            gathered = {k: torch.cat([p[k] for p in parts]).to(self.device) for k in parts[0]}
        reduced = kernel.gathered_reduce(strat, s.server, gathered, ctx)
        s.server = kernel.server_step(strat, s.server, s.stale.push(Ready(reduced)), ctx)

    def _finish_mix(self, t: int, rows: list[Tree], mine: torch.Tensor, mask: torch.Tensor,
                    plan: Plan) -> None:
        s, strat = self.state, self.strategy
        assert self.mixing is not None and strat.node_update is not None
        payload = {k: torch.cat([p[k] for p in rows]) for k in rows[0]}
        mixed = self.comm.mix(self.mixing.at(t), payload, mine, dict(strat.mixing))
        for c, ids in enumerate(self._chunks(mine)):
            part = {k: v[c * self.chunk:c * self.chunk + ids.numel()] for k, v in mixed.items()}
            s.store.scatter(ids, strat.node_update(s.store.gather(ids), part, self._ctx(t, ids, mask, plan)))

    def flush(self) -> None:
        """Add the byte counts and simulated times of the rounds since the last flush, combined
        over processes (a sum and a max collective per evaluation, so a round has no blocking
        sync but its own reduction)."""
        if not self._round_bytes:
            return
        sums = torch.tensor([[*b, *r.sums()] for b, r in zip(self._round_bytes, self._round_times,
                                                               strict=True)], dtype=torch.float64)
        maxima = torch.tensor([r.maxima() for r in self._round_times], dtype=torch.float64)
        sums = self.comm.allreduce_scalars(sums.reshape(-1)).reshape(-1, 4)
        maxima = self.comm.allreduce_max(maxima.reshape(-1)).reshape(-1, 4)
        collective = self.strategy.comm == "reduce" and self.system.cfg.network == "allreduce"
        for row, mx in zip(sums.tolist(), maxima.tolist(), strict=True):
            self.state.bytes.add(int(row[0]), int(row[1]))
            if self.asyn is None:  # asynchronous rounds move the clock themselves
                self.clock.advance(self.system, mx, row[2:], overlap=self.strategy.staleness > 0,
                                   collective=collective)
        self._round_bytes, self._round_times = [], []

    # ---- evaluation ----------------------------------------------------------------------
    def node_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [n_own], model rows [n_own, P]) of the nodes this process owns (gossip)."""
        ids = torch.as_tensor(self.owned, device=self.device)
        return ids, self.state.store.gather(ids)[self.strategy.model_key]

    def evaluate(self, t: int) -> dict[str, Any]:
        """The metrics line of round t (collectives on every process; rank 0 tests the model)."""
        s, strat = self.state, self.strategy
        self.flush()
        tl = self.comm.allreduce_scalars(torch.tensor(self.train_loss, dtype=torch.float64))
        self.train_loss = [0.0, 0.0]
        if strat.comm == "reduce":
            x = s.server[strat.model_key]
        else:
            _, rows = self.node_rows()
            x = self.comm.allreduce({"x": rows.sum(0)})["x"] / self.num_clients
        owned = torch.as_tensor(self.owned, device=self.device)
        nodes = (lambda ids: s.store.gather(ids)[strat.model_key]) if strat.comm == "mix" else None
        test, per_client = kernel.evaluation(self.problem, x, owned, self.num_clients, models_of=nodes,
                                             allreduce=self.comm.allreduce_scalars, here=self.comm.rank == 0)
        m = kernel.metrics_line(t, float(tl[0]), float(tl[1]), test, s.bytes, self.clock.now)
        if strat.comm == "mix":
            m.update(self._node_metrics(x))
        m.update(per_client)
        m.update(kernel.strategy_metrics(strat, s.server, self.participation, t, self.seed, self.sizes,
                                         self.dtype))
        m["wall_s"] = round(time.perf_counter() - self.t0, 4)
        return m

    def _node_metrics(self, avg: torch.Tensor) -> dict[str, Any]:
        ids, _ = self.node_rows()
        sums = torch.zeros(3, dtype=torch.float64)
        for chunk in self._chunks(ids):
            xs = self.state.store.gather(chunk)[self.strategy.model_key]
            sums[0] += float(((xs - avg) ** 2).sum())
            res = self.problem.evaluate(xs)
            if res is not None and res[1] is not None:
                sums[1] += float(res[1].double().sum())
                sums[2] += chunk.numel()
        tot = self.comm.allreduce_scalars(sums)
        acc = float(tot[1]) if float(tot[2]) > 0 else None
        return kernel.node_metrics(float(tot[0]), acc, self.num_clients)

    def run(self, progress: Progress | None = None, control: ckpt.Control | None = None
            ) -> list[dict[str, Any]]:
        """Rounds `state.round` .. `rounds`; returns the metrics lines. Ends with `finish`.

        With `control`: starts from its checkpoint (if any), checkpoints every `control.every`
        rounds and at the end, and on a stop signal finishes the round, checkpoints and raises
        `fedsim.checkpoint.Interrupted` (every process stops at the same round).
        """
        if control is not None and control.resume is not None:
            self.restore(control.resume, control.digest)
        self.t0 = time.perf_counter()  # metrics' wall_s counts rounds, not construction
        history = []
        for t in range(self.state.round, self.rounds):
            self.step(t)
            m = None
            if kernel.eval_due(t, self.eval_every, self.rounds):
                m = self.evaluate(t)
                history.append(m)
                self.on_eval(m)
            if progress:
                progress(t, m)
            if control is not None:
                signum = self._stop_signal(control)
                if signum or (control.due(t, self.rounds) and t + 1 < self.rounds):
                    self.save(control)
                if signum:
                    raise ckpt.Interrupted(signum, t + 1)
        self.finish()
        if control is not None:
            self.save(control)
        return history

    def _stop_signal(self, control: ckpt.Control) -> int:
        """The stop signal any process received (agreed on by every process)."""
        if self.comm.size == 1:
            return int(control.signal())
        return int(self.comm.allreduce_max(torch.tensor([float(control.signal())]))[0])

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self, control: ckpt.Control) -> None:
        """Checkpoint before round `state.round` (a collective: every process writes its part)."""
        s, comm = self.state, self.comm
        self.flush()
        stale = [p.wait() for p in s.stale.queue] + self.stale_tail
        s.stale.queue, self.stale_tail = [Ready(tree) for tree in stale], []
        ids, rows = s.store.rows()
        ckpt.write_part(control.folder, s.round, f"clients-{comm.rank:05d}.pt",
                        {**ckpt.clients_payload(ids, rows, self.train_loss, comm.rank, comm.size),
                         "async_rows": self.asyn.rows_state() if self.asyn else None})
        comm.allgather(None)  # every part is written
        if comm.rank == 0:
            schedule = self.asyn.schedule.state() if self.asyn else None
            ckpt.write_part(control.folder, s.round, "state.pt",
                            ckpt.state_payload(control, s.round, s.server, stale, s.bytes, self.clock,
                                               **{"async": schedule}))
            ckpt.commit(control.folder, s.round)
        comm.allgather(None)  # published before anyone goes on (or exits)

    def restore(self, path: str, digest: str) -> None:
        """Continue from checkpoint `path`: this process takes the rows of the clients it owns."""
        s, got = self.state, ckpt.restore(path, digest, self.device)
        s.round, s.server, s.bytes, self.clock = got.round, got.server, got.counter, got.clock
        s.stale.queue = [Ready(tree) for tree in got.stale]
        s.store.load(*got.rows(self.owned))
        self.train_loss = got.train_loss(self.comm.rank, self.comm.size)
        if self.asyn is not None:  # FedBuff: the schedule (global) and the trained rows not yet applied
            self.asyn.load(got.state["async"], [p["async_rows"] for p in got.parts])

    def finish(self) -> None:
        """Complete what is in flight: the stale tail of reductions and the byte counts."""
        self.stale_tail = self.state.stale.drain()
        self.flush()
