"""A fedsim strategy as a Flower Message-API strategy (`flwr.serverapp.strategy.Strategy`).

No algorithm math lives here: the adapter packs and unpacks records and calls the wrapped
strategy's functions (`weights`, `server_update`) and `fedsim.comm.weighted_sum`, exactly as the
engine loop (`fedsim.engines.loop.RoundLoop.step`) does, so a round in Flower equals a round of
the multiplex engine (same participation draws, same minibatches, same reduction order).

- Participation: `setup.participation.mask(round)` (seeded), never Flower's `random.sample`.
  Partition ids are mapped to Flower's (random) node ids by a first `query` round, after the
  adapter has waited for every node to register (Flower's simulation may start round 1 early).
- comm="mix" (gossip): Flower has no peer-to-peer links, so the ServerApp relays each node its
  in-neighbours' payloads along the scenario topology (message `train.mix`) and every node mixes
  locally. In a real deployment this traffic goes through the hub (SuperLink): `bytes_*` count
  the logical gossip edges like the other engines, `flower_bytes_*` what Flower actually moved.
- Evaluation is central, on the server, with `setup.problem().evaluate` (the engine's code path).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedsim.comm import ByteCounter, tree_bytes, weighted_sum
from fedsim.engines.loop import eval_metrics
from fedsim.flower.client import round_ctx
from fedsim.flower.records import message_bytes, pack_mask, record_to_tree, tree_to_record
from fedsim.types import Tree


class FedsimStrategy(FlowerStrategy):
    """Runs a built fedsim scenario (`fedsim.setup.Setup`) through Flower's `Strategy.start`.

    Args:
      setup: the built scenario (its strategy, participation, topology, problem).
      text: the resolved scenario YAML sent to nodes when they join (`client.scenario_text`).
      on_eval: called with each metrics dict (the keys of the multiplex engine's metrics.jsonl,
        plus flower_bytes_up / flower_bytes_down).
      progress: called after every round with (round index, metrics or None).
      timeout: seconds to wait for replies and for nodes to register.
    """

    def __init__(self, setup: Any, text: str, *, on_eval: Callable[[dict], None] | None = None,
                 progress: Callable[[int, dict | None], None] | None = None,
                 timeout: float = 3600.0) -> None:
        self.setup, self.text, self.timeout = setup, text, timeout
        self.strat = setup.strategy
        self.n, self.device, self.dtype = setup.num_clients, setup.device, setup.dtype
        self.on_eval, self.progress = on_eval or (lambda m: None), progress or (lambda t, m: None)
        self.problem = setup.problem()
        self.server: Tree = self.strat.init_server(setup.x0.to(self.device, self.dtype))
        self.fifo: list[Tree] = []
        self.node_of: dict[int, int] = {}
        self.pid_of: dict[int, int] = {}
        self.bytes, self.wire = ByteCounter(), [0, 0]
        self.train_loss = (0.0, 0)
        self.node_models: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []
        self._grid: Grid | None = None
        self._mixing: tuple[Any, dict[str, Any], np.ndarray] | None = None
        self.t0 = time.perf_counter()

    # ---- Flower Strategy API ---------------------------------------------------------------
    def summary(self) -> None:
        from logging import INFO

        from flwr.supercore import log

        sc = self.setup.scenario
        log(INFO, "\t├── fedsim strategy %s (comm=%s) on %d clients, %d rounds",
            sc.strategy.name, self.strat.comm, self.n, sc.rounds)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._grid = grid
        self._join(grid)
        t = server_round - 1
        mask = self.participants(t)
        down = self.strat.broadcast if self.strat.comm == "reduce" else ()
        content = RecordDict({
            "arrays": tree_to_record({k: self.server[k] for k in down if k in self.server}),
            "config": ConfigRecord({"round": t, "participants": pack_mask(mask)})})
        return [self._message(content, MessageType.TRAIN, int(p), server_round)
                for p in np.flatnonzero(mask)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t = server_round - 1
        mask = self.participants(t)
        rows = self._collect(replies, np.flatnonzero(mask))
        payload = {k: torch.cat([r[1][k] for r in rows]) for k in (rows[0][1] if rows else {})}
        metrics = [r[2] for r in rows]
        losses = torch.tensor([float(m["loss"]) for m in metrics if "loss" in m], dtype=torch.float64)
        self.train_loss = (self.train_loss[0] + float(losses.sum()), self.train_loss[1] + len(losses))
        up_rows = [int(np.ceil(float(m["up-bits"]) / 8)) if "up-bits" in m
                   else int(tree_bytes({k: v[None] for k, v in r[1].items()}, rows=False))
                   for r, m in zip(rows, metrics)]
        if self.strat.comm == "reduce":
            down_per = tree_bytes({k: self.server[k][None] for k in self.strat.broadcast
                                   if k in self.server}, rows=False)
            self.bytes.add(sum(up_rows), int(down_per) * len(rows))
            self._reduce(t, payload, mask)
            model = self.server[self.strat.model_key]
            return tree_to_record({self.strat.model_key: model}), MetricRecord({"clients": len(rows)})
        deg = self._mixing_ops(t)[2]
        up = int(sum(u * int(deg[r[0]]) for u, r in zip(up_rows, rows)))
        self.bytes.add(up, up)
        self._relay(t, payload, server_round)
        return None, MetricRecord({"clients": len(rows)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.strat.comm == "reduce" or not self._eval_round(server_round - 1):
            return []
        content = RecordDict({"config": ConfigRecord({"round": server_round - 1})})
        return [self._message(content, MessageType.EVALUATE, p, server_round) for p in range(self.n)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self.strat.comm == "mix" and self._eval_round(server_round - 1):
            self.node_models = torch.cat([r[1]["x"] for r in self._collect(replies, np.arange(self.n))])
        return None

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """`evaluate_fn` for `start`: central evaluation on eval rounds, progress every round."""
        if server_round == 0:
            return None
        t = server_round - 1
        m = self._metrics(t) if self._eval_round(t) else None
        if m is not None:
            self.history.append(m)
            self.on_eval(m)
        self.progress(t, m)
        return MetricRecord({k: v for k, v in m.items() if isinstance(v, (int, float))}) if m else None

    # ---- rounds ----------------------------------------------------------------------------
    def participants(self, t: int) -> np.ndarray:
        if self.strat.comm == "mix":
            return np.ones(self.n, dtype=bool)
        return np.asarray(self.setup.participation.mask(t), dtype=bool)

    def _reduce(self, t: int, payload: Tree, mask: np.ndarray) -> None:
        strat = self.strat
        ids = torch.as_tensor(np.flatnonzero(mask), device=self.device)
        ctx = round_ctx(self.setup, t, ids, mask)
        reduced: Tree = {}
        if payload:
            w = strat.weights(self.server, ctx) if strat.weights else ctx.weight
            reduced = weighted_sum(payload, w)
        if strat.staleness:
            self.fifo.append(reduced)
            if len(self.fifo) <= strat.staleness:
                return
            reduced = self.fifo.pop(0)
        self.server = strat.server_update(self.server, reduced, ctx)

    def _mixing_ops(self, t: int) -> tuple[Any, dict[str, Any], np.ndarray]:
        """(mixing matrix, {"W", "mean"} as CSR tensors, out-degrees) of round t (as the loop)."""
        from fedsim.engines.loop import _neighbour_mean

        topo = self.setup.topology
        key = 0 if topo.static else t
        if self._mixing is None or self._mixing[0] != key:
            mm = topo.mixing(t, rule=self.setup.scenario.topology.mixing)
            ops = {"W": mm.to_torch(self.device, self.dtype).to_sparse_csr(),
                   "mean": _neighbour_mean(mm, self.device, self.dtype)}
            self._mixing = (key, ops, np.diff(np.asarray(mm.indptr)) - 1)
        return self._mixing

    def _relay(self, t: int, payload: Tree, server_round: int) -> None:
        """Send each node its in-neighbours' payload rows and their mixing weights."""
        ops = self._mixing_ops(t)[1]
        csr = {k: ops[self.strat.mixing.get(k, "W")] for k in payload}
        msgs = []
        for p in range(self.n):
            rows, weights = {}, {}
            for k, v in payload.items():
                crow, col, val = csr[k].crow_indices(), csr[k].col_indices(), csr[k].values()
                cols = col[crow[p]:crow[p + 1]]
                rows[k], weights[k] = v[cols], val[crow[p]:crow[p + 1]]
            content = RecordDict({"arrays": tree_to_record(rows), "weights": tree_to_record(weights),
                                  "config": ConfigRecord({"round": t})})
            msgs.append(self._message(content, "train.mix", p, server_round))
        assert self._grid is not None
        self._collect(self._grid.send_and_receive(msgs, timeout=self.timeout), np.arange(self.n))

    # ---- evaluation (the loop's metrics, computed from what the server holds) ---------------
    def _eval_round(self, t: int) -> bool:
        sc = self.setup.scenario
        return (t + 1) % sc.eval.every == 0 or t + 1 == sc.rounds

    def _metrics(self, t: int) -> dict[str, Any]:
        mix = self.strat.comm == "mix"
        if mix:
            assert self.node_models is not None
            x = self.node_models.sum(0) / self.n
        else:
            x = self.server[self.strat.model_key]
        res = self.problem.evaluate(x[None])
        tl = torch.tensor(self.train_loss, dtype=torch.float64)
        self.train_loss = (0.0, 0)
        m = eval_metrics(t, tl, res, self.bytes)
        if mix:
            xs = self.node_models
            acc = self.problem.evaluate(xs)
            m["consensus_distance"] = float(((xs - x) ** 2).sum().double() / self.n)
            m["node_accuracy_mean"] = (float(acc[1].sum() / self.n) if acc and acc[1] is not None
                                       else 0.0)
        m["flower_bytes_up"], m["flower_bytes_down"] = self.wire[1], self.wire[0]
        m["wall_s"] = round(time.perf_counter() - self.t0, 4)
        return m

    # ---- messaging -------------------------------------------------------------------------
    def _message(self, content: RecordDict, mtype: str, pid: int, server_round: int) -> Message:
        msg = Message(content=content, dst_node_id=self.node_of[pid], message_type=mtype,
                      group_id=str(server_round))
        self.wire[0] += message_bytes(msg)
        return msg

    def _collect(self, replies: Iterable[Message], expected: np.ndarray
                 ) -> list[tuple[int, Tree, Any]]:
        """(partition id, arrays as a Tree, metrics) of each reply, by partition id; errors raise."""
        out = []
        for r in replies:
            self.wire[1] += message_bytes(r)
            if r.has_error():
                raise RuntimeError(f"Flower node {r.metadata.src_node_id} failed: {r.error.reason}")
            c = r.content
            arrays = record_to_tree(c["arrays"], self.device) if "arrays" in c else {}
            out.append((self.pid_of[r.metadata.src_node_id], arrays, c.get("metrics", {})))
        out.sort(key=lambda r: r[0])
        got = [r[0] for r in out]
        if got != [int(p) for p in expected]:
            missing = sorted(set(int(p) for p in expected) - set(got))
            raise RuntimeError(f"no reply from partitions {missing[:10]} (timeout {self.timeout}s)")
        return out

    def _join(self, grid: Grid) -> None:
        """Wait for all nodes, send them the scenario, and map partition ids to node ids."""
        if self.node_of:
            return
        deadline = time.time() + self.timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.n:
            if time.time() > deadline:
                raise RuntimeError(f"{len(nodes)} of {self.n} Flower nodes registered "
                                   f"after {self.timeout}s")
            time.sleep(0.05)
        if len(nodes) != self.n:
            raise RuntimeError(f"the federation has {len(nodes)} nodes but the scenario has "
                               f"{self.n} clients: run it with {self.n} SuperNodes")
        content = RecordDict({"config": ConfigRecord({"scenario": self.text})})
        msgs = [Message(content=content, dst_node_id=nid, message_type=MessageType.QUERY)
                for nid in nodes]
        self.wire[0] += sum(message_bytes(m) for m in msgs)
        for r in grid.send_and_receive(msgs, timeout=self.timeout):
            self.wire[1] += message_bytes(r)
            if r.has_error():
                raise RuntimeError(f"Flower node {r.metadata.src_node_id} could not join: "
                                   f"{r.error.reason}")
            pid = int(r.content["config"]["partition-id"])
            self.node_of[pid], self.pid_of[r.metadata.src_node_id] = r.metadata.src_node_id, pid
        if sorted(self.node_of) != list(range(self.n)):
            raise RuntimeError(f"partition ids of the nodes are {sorted(self.node_of)[:10]}..., "
                               f"expected 0..{self.n - 1}")
