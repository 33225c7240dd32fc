"""The ClientApp of a fedsim strategy: one Flower node = one client (m = 1) on its own partition.

Messages (all built by `fedsim.flower.adapter.FlowerAdapter`):
  query          join: config["scenario"] (the resolved scenario YAML). The node builds the
                 scenario (cached per process), resets its strategy state, and replies with its
                 `partition-id` (from `context.node_config`, as Flower's simulation sets it).
  train          arrays: the server keys of `strategy.broadcast`; config: round, participants.
                 The node runs the kernel's `client_step` (the strategy's `local`) on its
                 partition with `problem.oracle(ids=[partition_id], round)` (the same keyed
                 minibatches as the multiplex engine) and replies arrays = payload row,
                 metrics = loss, num-examples, up-bytes (the kernel's byte rule). Per-client state (SCAFFOLD c_i, EF21 g_i, momentum) stays in
                 `context.state["fedsim.client"]`, as on a real device.
  train.mix      (comm="mix") arrays: the payload rows of this node's in-neighbours; weights:
                 their mixing weights. The node mixes locally and runs `strategy.node_update`.
  evaluate       (comm="mix") the node replies with its model row for central evaluation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml

from fedsim import round as kernel
from fedsim.comm import weighted_sum
from fedsim.flower.records import record_to_tree, tree_to_record, unpack_mask
from fedsim.types import RoundCtx, Tree

STATE_KEY = "fedsim.client"
RUN_KEY = "fedsim.run"


@dataclass
class NodeScenario:
    """A scenario built in this process, and each node's view of its own data."""

    setup: Any
    text: str
    own: dict[int, Any] = field(default_factory=dict)
    server0: Tree | None = None

    def node_problem(self, pid: int) -> Any:
        """The problem restricted to client `pid`'s data (what the device holds)."""
        if pid not in self.own:
            self.own[pid] = self.setup.problem().restrict(np.array([pid]))
        return self.own[pid]

    def gossip_server(self) -> Tree:
        """comm="mix": the constant shared tree `init_server(x0)`, computed on the node (no server)."""
        if self.server0 is None:
            self.server0 = self.setup.strategy.init_server(self.setup.x0)
        return self.server0


_BUILT: dict[str, NodeScenario] = {}


def scenario_text(scenario: Any) -> str:
    """The fully resolved scenario as YAML (what the server sends nodes when they join)."""
    from fedsim.config import to_dict

    return yaml.safe_dump(to_dict(scenario), sort_keys=False)


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def register_setup(text: str, setup: Any) -> None:
    """Share an already built Setup with the ClientApps of this process (in-process runtimes)."""
    if _key(text) not in _BUILT:
        _BUILT[_key(text)] = NodeScenario(setup, text)


def built(text: str) -> NodeScenario:
    """The scenario `text` built in this process (cached)."""
    k = _key(text)
    if k not in _BUILT:
        from fedsim.config import parse_scenario
        from fedsim.setup import build_setup

        _BUILT[k] = NodeScenario(build_setup(parse_scenario(yaml.safe_load(text))), text)
    return _BUILT[k]


def _ctx(setup: Any, t: int, pid: int, mask: np.ndarray) -> RoundCtx:
    """The kernel's RoundCtx of client `pid` alone (m = 1) in round t."""
    ids = torch.tensor([pid], device=setup.device)
    return kernel.make_ctx(t, setup.scenario.seed, ids, torch.as_tensor(mask, device=setup.device),
                           torch.as_tensor(setup.sizes, device=setup.device), setup.dtype)


# ---- node-side work (plain functions of a Message and a Context) -------------------------------

def _node(context: Any) -> tuple[NodeScenario, int]:
    if RUN_KEY not in context.state:
        raise RuntimeError("fedsim node received work before joining (no query message)")
    return built(str(context.state[RUN_KEY]["scenario"])), int(context.node_config["partition-id"])


def _load_state(context: Any, sc: NodeScenario, ids: torch.Tensor) -> Tree:
    if STATE_KEY in context.state:
        return record_to_tree(context.state[STATE_KEY], sc.setup.device)
    return sc.setup.strategy.init_clients(sc.setup.initial_models(ids), ids)


def _reply(msg: Any, **records: Any) -> Any:
    from flwr.app import Message, RecordDict

    return Message(RecordDict(records), reply_to=msg)


def join(msg: Any, context: Any) -> Any:
    """Build the scenario, check the partition, reset this node's strategy state."""
    from flwr.app import ConfigRecord

    text = str(msg.content["config"]["scenario"])
    sc = built(text)
    pid, n = int(context.node_config["partition-id"]), sc.setup.num_clients
    parts = int(context.node_config.get("num-partitions", n))
    if parts != n or not 0 <= pid < n:
        raise ValueError(f"node partition-id {pid} of num-partitions {parts} does not fit the "
                         f"scenario's {n} clients (run the federation with {n} nodes)")
    context.state[RUN_KEY] = ConfigRecord({"scenario": text})
    if STATE_KEY in context.state:
        del context.state[STATE_KEY]
    return _reply(msg, config=ConfigRecord({"partition-id": pid}))


def train(msg: Any, context: Any) -> Any:
    """One round of `strategy.local` for this node (m = 1)."""
    from flwr.app import MetricRecord

    sc, pid = _node(context)
    setup, strat = sc.setup, sc.setup.strategy
    cfg = msg.content["config"]
    t = int(cfg["round"])
    ctx = _ctx(setup, t, pid, unpack_mask(cfg["participants"], setup.num_clients))
    server = (record_to_tree(msg.content["arrays"], setup.device) if strat.comm == "reduce"
              else sc.gossip_server())
    clients = _load_state(context, sc, ctx.ids)
    out = kernel.client_step(strat, server, clients, sc.node_problem(pid).oracle(ctx.ids, t), ctx)
    context.state[STATE_KEY] = tree_to_record(out.clients)
    metrics: dict[str, Any] = {"num-examples": int(setup.sizes[pid]),
                               "up-bytes": int(out.up_bytes.sum())}
    if out.loss is not None:
        metrics["loss"] = float(out.loss.double().sum())
    return _reply(msg, arrays=tree_to_record(out.payload), metrics=MetricRecord(metrics))


def mix(msg: Any, context: Any) -> Any:
    """comm="mix": combine the neighbours' rows with their weights, then `strategy.node_update`."""
    from flwr.app import MetricRecord

    sc, pid = _node(context)
    setup = sc.setup
    rows = record_to_tree(msg.content["arrays"], setup.device)
    weights = record_to_tree(msg.content["weights"], setup.device)
    mixed = {k: weighted_sum({k: v}, weights[k])[k][None] for k, v in rows.items()}
    ctx = _ctx(setup, int(msg.content["config"]["round"]), pid, np.ones(setup.num_clients, bool))
    clients = setup.strategy.node_update(_load_state(context, sc, ctx.ids), mixed, ctx)
    context.state[STATE_KEY] = tree_to_record(clients)
    return _reply(msg, metrics=MetricRecord({"num-examples": int(setup.sizes[pid])}))


def model(msg: Any, context: Any) -> Any:
    """comm="mix": this node's model row (for the server's central evaluation)."""
    sc, pid = _node(context)
    ids = torch.tensor([pid], device=sc.setup.device)
    row = _load_state(context, sc, ids)[sc.setup.strategy.model_key]
    return _reply(msg, arrays=tree_to_record({"x": row}))


def make_client_app(threads: int | None = None) -> Any:
    """The fedsim ClientApp (`threads`: torch intra-op threads in this process, None = keep)."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def wrap(fn: Any) -> Any:
        def handler(msg: Any, context: Any) -> Any:
            if threads:
                torch.set_num_threads(threads)
            return fn(msg, context)
        return handler

    app.query()(wrap(join))
    app.train()(wrap(train))
    app.train("mix")(wrap(mix))
    app.evaluate()(wrap(model))
    return app
