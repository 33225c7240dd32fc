"""What fedsim's ClientApp does on a block of m >= 1 nodes (one message each).

Every function takes the messages of one kind and the nodes' Contexts (same order) and returns
one reply per message. Under Flower's own runtimes (a deployment, Ray) m = 1; on fedsim's
grids (`fedsim.flower.grid`) m is every node of the host that got a message in the push, and
the local work runs as the multiplex engine runs it: nodes in ascending partition id, in
memory-bounded chunks (`fedsim.engines.loop.auto_chunk`), each chunk one stacked call of the
round kernel's `client_step` with the same `RoundCtx` and keyed minibatches. Per-node strategy
state (SCAFFOLD c_i, EF21 g_i, momentum) lives in each node's `Context.state[STATE_KEY]`
as an `ArrayRecord` of [1, ...] rows, read and written back per node.

Two kinds of ServerApp talk to these nodes:
- fedsim's `FlowerAdapter` (any fedsim strategy): train config {round, participants}, arrays
  = the strategy's broadcast keys; replies carry the payload rows;
- a Flower strategy object (`strategy: {name: flower, class: ...}`, `fedsim.flower.driver`):
  Flower's own messages (one ArrayRecord = the model per parameter tensor, config with
  "server-round"); replies carry the locally trained model, "num-examples" and "loss".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedsim import round as kernel
from fedsim.comm import weighted_sum
from fedsim.flower.records import (
    model_record,
    record_model,
    record_to_tree,
    rows_to_records,
    stack_records,
    unpack_mask,
)
from fedsim.types import Tree

STATE_KEY = "fedsim.client"
RUN_KEY = "fedsim.run"


@dataclass(frozen=True)
class Options:
    """How a host runs its nodes: clients per stacked call (None: from `memory_mb`)."""

    chunk_size: int | None = None
    memory_mb: int = 2048


@dataclass
class Block:
    """The nodes of one call, ascending by partition id (`order` maps back to the messages)."""

    scenario: Any            # fedsim.flower.client.NodeScenario
    msgs: list[Message]
    contexts: list[Any]
    pids: np.ndarray
    order: np.ndarray

    @property
    def setup(self) -> Any:
        return self.scenario.setup

    def chunks(self, opts: Options) -> list[np.ndarray]:
        """Positions (into `order`) of each memory-bounded chunk."""
        from fedsim.engines.loop import auto_chunk

        size = opts.chunk_size or auto_chunk(self.setup.problem(), opts.memory_mb)
        return [np.arange(c, min(c + size, len(self.order))) for c in range(0, len(self.order), size)]

    def ids(self, pos: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(self.pids[self.order[pos]], device=self.setup.device)

    def sizes(self) -> torch.Tensor:
        return torch.as_tensor(self.setup.sizes, device=self.setup.device)


def block(scenario: Any, msgs: Sequence[Message], contexts: Sequence[Any]) -> Block:
    pids = np.array([int(c.node_config["partition-id"]) for c in contexts], dtype=np.int64)
    return Block(scenario, list(msgs), list(contexts), pids, np.argsort(pids, kind="stable"))


# ---- per-node state in Context.state ---------------------------------------------------------

def gather(b: Block, pos: np.ndarray, ids: torch.Tensor) -> Tree:
    """Client state rows [m, ...] of the nodes at `pos` (initialised on first use)."""
    setup, strat = b.setup, b.setup.strategy
    ctxs = [b.contexts[i] for i in b.order[pos]]
    have = np.array([STATE_KEY in c.state for c in ctxs], dtype=bool)
    old = stack_records([c.state[STATE_KEY] for c, h in zip(ctxs, have, strict=True) if h], setup.device)
    new_ids = ids[torch.as_tensor(~have, device=ids.device)]
    new = strat.init_clients(setup.initial_models(new_ids), new_ids) if new_ids.numel() else {}
    if not have.any():
        return new
    if not new_ids.numel():
        return old
    out = {}
    for k in new:
        rows = torch.empty((len(pos), *new[k].shape[1:]), dtype=new[k].dtype, device=new[k].device)
        rows[torch.as_tensor(have, device=rows.device)] = old[k].to(rows.dtype)
        rows[torch.as_tensor(~have, device=rows.device)] = new[k]
        out[k] = rows
    return out


def scatter(b: Block, pos: np.ndarray, clients: Tree) -> None:
    """Write each node's state row back into its Context.state (nothing for stateless ones)."""
    if not clients:
        return
    for j, rec in zip(b.order[pos], rows_to_records(clients, len(pos)), strict=True):
        b.contexts[j].state[STATE_KEY] = rec


# ---- local training ----------------------------------------------------------------------------

def local_steps(b: Block, opts: Options, t: int, mask: torch.Tensor, server: Tree,
                payload: Callable[[kernel.ClientStep], list[tuple[str, Any]]],
                steps: list[int] | None = None) -> list[Message]:
    """The kernel's `client_step` on every chunk of `b`; `payload(chunk output)` gives each
    row's (record key, ArrayRecord) for its reply, next to the metrics."""
    setup = b.setup
    problem, sizes = setup.problem(), b.sizes()
    out: list[Message | None] = [None] * len(b.msgs)
    for pos in b.chunks(opts):
        ids = b.ids(pos)
        budget = None if steps is None else torch.as_tensor(steps, device=ids.device)[ids]
        ctx = kernel.make_ctx(t, setup.scenario.seed, ids, mask, sizes, setup.dtype, budget)
        step = kernel.client_step(setup.strategy, server, gather(b, pos, ids), problem, ctx)
        scatter(b, pos, step.clients)
        loss = None if step.loss is None else step.loss.double().tolist()
        up, samples = step.up_bytes.tolist(), step.samples.tolist()
        for row, ((key, rec), j) in enumerate(zip(payload(step), b.order[pos], strict=True)):
            m: dict[str, Any] = {"num-examples": int(setup.sizes[b.pids[j]]), "up-bytes": int(up[row]),
                                 "samples": float(samples[row])}
            if loss is not None:
                m["loss"] = float(loss[row])
            out[j] = Message(RecordDict({key: rec, "metrics": MetricRecord(m)}), reply_to=b.msgs[j])
    return out  # type: ignore[return-value]


def train_fedsim(b: Block, opts: Options) -> list[Message]:
    """fedsim's adapter: one round of `strategy.local` (config: round, participants)."""
    setup, strat = b.setup, b.setup.strategy
    content = b.msgs[0].content
    cfg = content["config"]
    t = int(cast(int, cfg["round"]))
    mask = torch.as_tensor(unpack_mask(cast(bytes, cfg["participants"]), setup.num_clients),
                           device=setup.device)
    server = (record_to_tree(content["arrays"], setup.device) if strat.comm == "reduce"
              else b.scenario.gossip_server())

    def payload(step: kernel.ClientStep) -> list[tuple[str, Any]]:
        return [("arrays", r) for r in rows_to_records(step.payload, int(step.up_bytes.shape[0]))]
    steps = cast(list[int], cfg["steps"]) if "steps" in cfg else None
    return local_steps(b, opts, t, mask, server, payload, steps)


def _only(records: Mapping[str, Any], kind: str) -> tuple[str, Any]:
    if len(records) != 1:
        raise ValueError(f"expected one {kind} in the message, got {sorted(records)}")
    return next(iter(records.items()))


def train_flower(b: Block, opts: Options) -> list[Message]:
    """A Flower strategy's train message: local SGD from its model, reply the trained model."""
    setup = b.setup
    content = b.msgs[0].content
    key, arrays = _only(content.array_records, "ArrayRecord")
    _, cfg = _only(content.config_records, "ConfigRecord")
    t = int(cfg["server-round"]) - 1
    server = {"x": record_model(arrays, setup.model.spec, setup.device, setup.dtype)}
    if float(cfg.get("proximal-mu", 0.0)):
        server["proximal_mu"] = torch.tensor(float(cfg["proximal-mu"]), dtype=setup.dtype)
    mask = torch.zeros(setup.num_clients, dtype=torch.bool, device=setup.device)
    mask[torch.as_tensor(b.pids, device=setup.device)] = True

    def payload(step: kernel.ClientStep) -> list[tuple[str, Any]]:
        rows = step.payload["x"].detach().cpu().numpy()
        return [(key, model_record(r, setup.model.spec)) for r in rows]
    return local_steps(b, opts, t, mask, server, payload)


# ---- gossip mixing and evaluation ------------------------------------------------------------

def mix(b: Block, opts: Options) -> list[Message]:
    """comm="mix": each node combines its in-neighbours' rows with their weights, then the
    block runs `strategy.node_update` (chunked like the training)."""
    setup = b.setup
    t = int(cast(int, b.msgs[0].content["config"]["round"]))
    sizes, everyone = b.sizes(), torch.ones(setup.num_clients, dtype=torch.bool, device=setup.device)
    out: list[Message | None] = [None] * len(b.msgs)
    for pos in b.chunks(opts):
        ids = b.ids(pos)
        parts = []
        for j in b.order[pos]:
            rows = record_to_tree(b.msgs[j].content["arrays"], setup.device)
            weights = record_to_tree(b.msgs[j].content["weights"], setup.device)
            parts.append({k: weighted_sum({k: v}, weights[k])[k][None] for k, v in rows.items()})
        mixed = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        ctx = kernel.make_ctx(t, setup.scenario.seed, ids, everyone, sizes, setup.dtype)
        scatter(b, pos, setup.strategy.node_update(gather(b, pos, ids), mixed, ctx))
        for j in b.order[pos]:
            metrics = MetricRecord({"num-examples": int(setup.sizes[b.pids[j]])})
            out[j] = Message(RecordDict({"metrics": metrics}), reply_to=b.msgs[j])
    return out  # type: ignore[return-value]


def model_rows(b: Block, opts: Options) -> list[Message]:
    """comm="mix": each node's model row (for the server's central evaluation)."""
    key = b.setup.strategy.model_key
    out: list[Message | None] = [None] * len(b.msgs)
    for pos in b.chunks(opts):
        rows = rows_to_records({"x": gather(b, pos, b.ids(pos))[key]}, len(pos))
        for r, j in zip(rows, b.order[pos], strict=True):
            out[j] = Message(RecordDict({"arrays": r}), reply_to=b.msgs[j])
    return out  # type: ignore[return-value]


def state_rows(b: Block, opts: Options) -> list[Message]:
    """Each node's strategy state rows (a checkpoint; no arrays for stateless strategies)."""
    out: list[Message | None] = [None] * len(b.msgs)
    for pos in b.chunks(opts):
        rows = gather(b, pos, b.ids(pos))
        recs: list[Any] = rows_to_records(rows, len(pos)) if rows else [None] * len(pos)
        for r, j in zip(recs, b.order[pos], strict=True):
            out[j] = Message(RecordDict({} if r is None else {"arrays": r}), reply_to=b.msgs[j])
    return out  # type: ignore[return-value]


def restore_rows(b: Block, opts: Options) -> list[Message]:
    """A resumed run: each node takes back its state rows from the checkpoint (if it had any)."""
    out = []
    for j, msg in enumerate(b.msgs):
        if "arrays" in msg.content:
            b.contexts[j].state[STATE_KEY] = msg.content["arrays"]
        out.append(Message(RecordDict({}), reply_to=msg))
    return out


def evaluate_flower(b: Block, opts: Options) -> list[Message]:
    """A Flower strategy's evaluate message: the model on each node's own test split
    (`eval_loss`, `eval_acc`, num-examples = test samples), or, without test splits, its
    full-batch training loss (`eval_loss`, num-examples = training samples)."""
    setup, problem = b.setup, b.setup.problem()
    _, arrays = _only(b.msgs[0].content.array_records, "ArrayRecord")
    x = record_model(arrays, setup.model.spec, setup.device, setup.dtype)
    out: list[Message | None] = [None] * len(b.msgs)
    for pos in b.chunks(opts):
        ids = b.ids(pos)
        xs = x.expand(len(pos), -1)
        res = problem.evaluate_clients(xs, ids) if problem.client_test is not None else None
        if res is not None:
            loss, correct, count = (v.tolist() for v in res)
            rows = [{"eval_loss": lo / max(c, 1), "eval_acc": a / max(c, 1), "num-examples": int(c)}
                    for lo, a, c in zip(loss, correct, count, strict=True)]
        else:
            loss = problem.oracle(ids, 0).full(xs)[0].double().tolist()
            rows = [{"eval_loss": lo, "num-examples": int(setup.sizes[i])}
                    for lo, i in zip(loss, ids.tolist(), strict=True)]
        for r, j in zip(rows, b.order[pos], strict=True):
            out[j] = Message(RecordDict({"metrics": MetricRecord(r)}), reply_to=b.msgs[j])
    return out  # type: ignore[return-value]


def join_reply(msg: Message, pid: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"partition-id": pid})}), reply_to=msg)
