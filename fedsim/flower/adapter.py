"""A fedsim strategy as a Flower Message-API strategy (`flwr.serverapp.strategy.Strategy`).

Record packing and messaging only: what a round means comes from the round kernel
(`fedsim.round`: participants, `RoundCtx`, weights, the staleness FIFO, the byte rule, the
metrics line), exactly as in the multiplex engine's loop, so a round in Flower equals a round
there (same participation draws, same minibatches, same reduction order).

- Participation: the scenario's seeded draws, never Flower's `random.sample`. Partition ids
  are mapped to Flower's (random) node ids by a first `query` round, after the adapter has
  waited for every node to register (Flower's simulation may start round 1 early).
- comm="mix" (gossip): Flower has no peer-to-peer links, so the ServerApp relays each node its
  in-neighbours' payloads along the scenario topology (message `train.mix`) and every node mixes
  locally. In a real deployment this traffic goes through the hub (SuperLink): `bytes_*` count
  the logical gossip edges like the other engines, `flower_bytes_*` what Flower actually moved.
- Evaluation is central, on the server, with the scenario's problem (the engine's code path).
- Checkpoints (`fedsim.checkpoint`): the server side as the multiplex engine's, the nodes'
  strategy state fetched with a `query.state` message and put back after a resumed run's join
  with `query.restore` (Flower messages, so any runtime's nodes take part); the bytes of those
  messages are not counted in `flower_bytes_*`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedsim import checkpoint as ckpt
from fedsim import round as kernel
from fedsim.comm import Ready
from fedsim.flower.federation import Federation
from fedsim.flower.records import pack_mask, rows_to_records, tree_to_record
from fedsim.system import Clock, Plan, RoundRecord
from fedsim.types import OnEval, Progress, Tree


class FlowerAdapter(FlowerStrategy):
    """Runs a built fedsim scenario (`fedsim.setup.Setup`) through Flower's `Strategy.start`.

    Args:
      setup: the built scenario (its strategy, participation, topology, problem).
      text: the resolved scenario YAML sent to nodes when they join (`client.scenario_text`).
      on_eval: called with each metrics line (the keys of the multiplex engine's
        metrics.jsonl, plus flower_bytes_up / flower_bytes_down).
      progress: called after every round with (round index, metrics or None).
      timeout: seconds to wait for replies and for nodes to register.
      control: checkpoints and stop signals (`fedsim.checkpoint.Control`; None: none).
    """

    def __init__(self, setup: Any, text: str, *, on_eval: OnEval | None = None,
                 progress: Progress | None = None, timeout: float = 3600.0,
                 control: ckpt.Control | None = None) -> None:
        self.setup, self.text, self.timeout = setup, text, timeout
        self.strategy = setup.strategy
        self.n, self.device, self.dtype = setup.num_clients, setup.device, setup.dtype
        self.on_eval: OnEval = on_eval or (lambda m: None)
        self.progress: Progress = progress or (lambda t, m: None)
        self.problem = setup.problem()
        self.sizes = torch.as_tensor(setup.sizes, device=self.device)
        self.server: Tree = self.strategy.init_server(setup.x0.to(self.device, self.dtype))
        self.stale = kernel.Staleness(self.strategy.staleness)
        self.mixing = (kernel.MixingOps(setup.topology, setup.scenario.topology.mixing, self.device,
                                        self.dtype) if self.strategy.comm == "mix" else None)
        self.fed = Federation(self.n, timeout, self.device)
        self.system = setup.system
        self.clock = Clock()
        self._plans: dict[int, Plan] = {}
        self.bytes = kernel.ByteCounter()
        self.train_loss = [0.0, 0.0]
        self.node_models: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []
        self._grid: Grid | None = None
        self.t0 = time.perf_counter()
        self.join_s = 0.0
        self.control = control
        self.offset = 0   # rounds done before this process started (a resumed run)

    def join(self, grid: Grid) -> None:
        """The nodes join (set-up, as the multiplex engine's data placement): the metrics'
        `wall_s` counts from the first round; `join_s` is the time the join took."""
        t = time.perf_counter()
        self._grid = grid
        self.fed.join(grid, self.text)
        self.t0 = time.perf_counter()
        self.join_s = self.t0 - t

    @property
    def wire(self) -> list[int]:
        """[bytes down, bytes up] of every message Flower moved (records' `count_bytes()`)."""
        return self.fed.wire

    # ---- Flower Strategy API ---------------------------------------------------------------
    def summary(self) -> None:
        import logging

        sc = self.setup.scenario
        logging.getLogger("flwr").info("\t├── fedsim strategy %s (comm=%s) on %d clients, %d "
                                       "rounds", sc.strategy.name, self.strategy.comm, self.n,
                                       sc.rounds)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._grid = grid
        self.fed.join(grid, self.text)
        t = self._t(server_round)
        plan = self._plan(t)
        mask = plan.mask
        down = self.strategy.broadcast if self.strategy.comm == "reduce" else ()
        sent: dict[str, Any] = {"round": t, "participants": pack_mask(mask)}
        steps = kernel.block_steps(plan, self.setup.work, self.strategy, t,
                                   torch.arange(self.n, device=self.device))
        if steps is not None:  # each node's local-step budget (work, deadline caps)
            sent["steps"] = [int(v) for v in steps.tolist()]
        content = RecordDict({
            "arrays": tree_to_record({k: self.server[k] for k in down if k in self.server}),
            "config": ConfigRecord(sent)})
        return [self.fed.message(content, MessageType.TRAIN, int(p), server_round)
                for p in np.flatnonzero(mask)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t = self._t(server_round)
        plan = self._plan(t)
        mask = plan.mask
        got = self.fed.collect(replies, np.flatnonzero(mask))
        for m in got.metrics:
            if "loss" in m:
                self.train_loss[0] += float(m["loss"])
                self.train_loss[1] += 1
        up_bytes = [int(m["up-bytes"]) for m in got.metrics]
        self._time(t, got, up_bytes)
        clients = MetricRecord({"clients": len(got.pids)})
        if self.strategy.comm == "reduce":
            down = kernel.broadcast_bytes(self.strategy, self.server) * len(got.pids)
            self.bytes.add(sum(up_bytes), down)
            self._reduce(t, got.arrays, plan)
            model = self.server[self.strategy.model_key]
            return tree_to_record({self.strategy.model_key: model}), clients
        assert self.mixing is not None
        self.mixing.at(t)
        up = sum(u * int(self.mixing.degrees[p]) for u, p in zip(up_bytes, got.pids, strict=True))
        self.bytes.add(up, up)
        self._relay(t, got.arrays, server_round)
        return None, clients

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.strategy.comm == "reduce" or not self._eval_due(self._t(server_round)):
            return []
        content = RecordDict({"config": ConfigRecord({"round": self._t(server_round)})})
        return [self.fed.message(content, MessageType.EVALUATE, p, server_round) for p in range(self.n)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self.strategy.comm == "mix" and self._eval_due(self._t(server_round)):
            self.node_models = self.fed.collect(replies, np.arange(self.n)).arrays["x"]
        return None

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """`evaluate_fn` for `start`: central evaluation on eval rounds, progress every round."""
        if server_round == 0:
            return None
        t = self._t(server_round)
        m = self._metrics(t) if self._eval_due(t) else None
        if m is not None:
            self.history.append(m)
            self.on_eval(m)
        self.progress(t, m)
        self._checkpoint(t)
        return MetricRecord({k: v for k, v in m.items() if isinstance(v, (int, float))}) if m else None

    def _t(self, server_round: int) -> int:
        """The scenario's 0-based round of Flower's server round (1-based, restarts on resume)."""
        return server_round - 1 + self.offset

    # ---- rounds (the kernel's rules) -------------------------------------------------------
    def _plan(self, t: int) -> Plan:
        """Round t's kept participants and step caps (computed once per round)."""
        if self._plans.get(t) is None:
            selected = kernel.participants(self.strategy, self.setup.participation, t, self.n, self.clock)
            self._plans = {t: kernel.plan_round(self.strategy, self.system, self.setup.work, t,
                                                selected, self.setup.sizes, self.problem.batch_size,
                                                self.server, self.problem.num_params)}
        return self._plans[t]

    def _time(self, t: int, got: Any, up_bytes: list[int]) -> None:
        """The round's simulated seconds from the replies (the kernel's rules)."""
        record = RoundRecord()
        pids = np.asarray(got.pids, dtype=np.int64)
        samples = np.array([float(m.get("samples", 0.0)) for m in got.metrics])
        degrees = None
        if self.mixing is not None:
            self.mixing.at(t)
            degrees = self.mixing.degrees.cpu().numpy()[pids]
        down = kernel.broadcast_bytes(self.strategy, self.server) if self.strategy.comm == "reduce" else 0
        kernel.record_times(record, self.system, self.strategy, t, pids, samples,
                            np.asarray(up_bytes, dtype=np.float64), down, degrees)
        collective = self.strategy.comm == "reduce" and self.system.cfg.network == "allreduce"
        self.clock.advance(self.system, record.maxima(), record.sums(),
                           overlap=self.strategy.staleness > 0, collective=collective)

    def _eval_due(self, t: int) -> bool:
        sc = self.setup.scenario
        return kernel.eval_due(t, sc.eval.every, sc.rounds)

    def _reduce(self, t: int, payload: Tree, plan: Plan) -> None:
        mask_t = torch.as_tensor(plan.mask, device=self.device)
        ids = torch.nonzero(mask_t).flatten()
        steps = kernel.block_steps(plan, self.setup.work, self.strategy, t, ids)
        ctx = kernel.make_ctx(t, self.setup.scenario.seed, ids, mask_t, self.sizes, self.dtype, steps)
        if self.strategy.aggregate is not None:  # robust aggregation: the rows are all here
            reduced = kernel.gathered_reduce(self.strategy, self.server, payload, ctx)
        else:
            reduced = kernel.block_partial(self.strategy, self.server, payload, ctx) if payload else {}
        self.server = kernel.server_step(self.strategy, self.server, self.stale.push(Ready(reduced)), ctx)

    def _relay(self, t: int, payload: Tree, server_round: int) -> None:
        """Send each node its in-neighbours' payload rows and their mixing weights."""
        assert self.mixing is not None and self._grid is not None
        ops = self.mixing.at(t)
        csr = {k: ops[self.strategy.mixing.get(k, "W")] for k in payload}
        msgs = []
        for p in range(self.n):
            rows, weights = {}, {}
            for k, v in payload.items():
                crow, col, val = csr[k].crow_indices(), csr[k].col_indices(), csr[k].values()
                rows[k], weights[k] = v[col[crow[p]:crow[p + 1]]], val[crow[p]:crow[p + 1]]
            content = RecordDict({"arrays": tree_to_record(rows), "weights": tree_to_record(weights),
                                  "config": ConfigRecord({"round": t})})
            msgs.append(self.fed.message(content, "train.mix", p, server_round))
        self.fed.collect(self._grid.send_and_receive(msgs, timeout=self.timeout), np.arange(self.n))

    def _metrics(self, t: int) -> dict[str, Any]:
        if self.strategy.comm == "mix":
            assert self.node_models is not None
            x = self.node_models.sum(0) / self.n
        else:
            x = self.server[self.strategy.model_key]
        nodes = self.node_models if self.strategy.comm == "mix" else None
        test, per_client = kernel.evaluation(self.problem, x, torch.arange(self.n, device=x.device), self.n,
                                             models_of=None if nodes is None else (lambda ids: nodes[ids]))
        m = kernel.metrics_line(t, self.train_loss[0], self.train_loss[1], test, self.bytes, self.clock.now)
        self.train_loss = [0.0, 0.0]
        if nodes is not None:
            res = self.problem.evaluate(nodes)
            acc = float(res[1].double().sum()) if res is not None and res[1] is not None else None
            m.update(kernel.node_metrics(float(((nodes - x) ** 2).sum()), acc, self.n))
        m.update(per_client)
        m.update(kernel.strategy_metrics(self.strategy, self.server, self.setup.participation, t,
                                         self.setup.scenario.seed, self.sizes, self.dtype))
        m["flower_bytes_up"], m["flower_bytes_down"] = self.fed.wire[1], self.fed.wire[0]
        m["wall_s"] = round(time.perf_counter() - self.t0, 4)
        return m

    # ---- checkpoints ---------------------------------------------------------------------
    def _checkpoint(self, t: int) -> None:
        """After round t: checkpoint when due or on a stop signal (then stop the run)."""
        c = self.control
        if c is None:
            return
        rounds, signum = self.setup.scenario.rounds, int(c.signal())
        if signum or (c.due(t, rounds) and t + 1 < rounds):
            self.save(t + 1)
        if signum:
            raise ckpt.Interrupted(signum, t + 1)

    def _ask(self, mtype: str, contents: list[RecordDict]) -> Any:
        """One message per node, outside the counted traffic."""
        assert self._grid is not None
        wire = list(self.fed.wire)
        msgs = [self.fed.message(c, mtype, p, 0) for p, c in enumerate(contents)]
        got = self.fed.collect(self._grid.send_and_receive(msgs, timeout=self.timeout), np.arange(self.n))
        self.fed.wire[:] = wire
        return got

    def save(self, round: int) -> None:
        """Checkpoint before round `round`: the server side here, every node's state rows."""
        assert self.control is not None
        ask = RecordDict({"config": ConfigRecord({})})
        rows = self._ask("query.state", [ask] * self.n).arrays
        ids = torch.arange(self.n) if rows else torch.zeros(0, dtype=torch.int64)
        folder = self.control.folder
        ckpt.write_part(folder, round, "clients-00000.pt", ckpt.clients_payload(ids, rows, self.train_loss))
        stale = [p.wait() for p in self.stale.queue]
        ckpt.write_part(folder, round, "state.pt", ckpt.state_payload(
            self.control, round, self.server, stale, self.bytes, self.clock,
            flower={"wire": list(self.fed.wire)}))
        ckpt.commit(folder, round)

    def restore(self, path: str) -> None:
        """Continue from checkpoint `path` (after the join): server side, then the nodes' state."""
        assert self.control is not None
        got = ckpt.restore(path, self.control.digest, self.device)
        self.offset, self.server, self.bytes, self.clock = got.round, got.server, got.counter, got.clock
        self.stale.queue = [Ready(tree) for tree in got.stale]
        self.train_loss = got.train_loss(0, 1)
        ids, rows = got.rows()
        if rows:
            records = dict(zip(ids.tolist(), rows_to_records(rows, ids.numel()), strict=True))
            empty = RecordDict({"config": ConfigRecord({})})
            self._ask("query.restore", [RecordDict({"arrays": records[p]}) if p in records else empty
                                        for p in range(self.n)])
        if "flower" in got.state:
            self.fed.wire[:] = [int(v) for v in got.state["flower"]["wire"]]


def run_adapter(grid: Grid, setup: Any, text: str, *, on_eval: OnEval | None = None,
                progress: Progress | None = None, timeout: float = 3600.0,
                control: ckpt.Control | None = None) -> FlowerAdapter:
    """Run scenario `setup` on `grid` with `FlowerAdapter.start`; returns the finished adapter.

    With `control`: resumes from its checkpoint, checkpoints as the round loop does (every
    `control.every` rounds, on a stop signal, at the end)."""
    adapter = FlowerAdapter(setup, text, on_eval=on_eval, progress=progress, timeout=timeout,
                            control=control)
    adapter.join(grid)
    if control is not None and control.resume is not None:
        adapter.restore(control.resume)
    key = adapter.strategy.model_key
    start = {key: adapter.server[key]} if key in adapter.server else {}
    left = setup.scenario.rounds - adapter.offset
    if left > 0:
        adapter.start(grid=grid, initial_arrays=tree_to_record(start), num_rounds=left,
                      timeout=timeout, evaluate_fn=adapter.evaluate)
    if control is not None:
        adapter.save(setup.scenario.rounds)
    return adapter


__all__ = ["FlowerAdapter", "run_adapter"]
