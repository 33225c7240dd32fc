"""Ray-free Flower runtimes: a `flwr.serverapp.Grid` that calls the ClientApps directly.

Any Flower ServerApp talks to its nodes through a `Grid` (`get_node_ids`, `push_messages`,
`pull_messages`, `send_and_receive`). `InProcessGrid` implements it with one `Context` per node
and delivers messages by calling the nodes' `ClientApp` in this process; `MpiGrid` spreads
the nodes over MPI ranks (rank 0 runs the ServerApp and hosts the first block of nodes; other
ranks serve theirs in `serve_mpi`).

Multiplexed nodes. A ClientApp with a `handle_batch(messages, contexts)` method (fedsim's own,
`fedsim.flower.client.FedsimClientApp`) receives everything pushed at once for the nodes of
one host as one call and answers with one reply per message: fedsim trains those nodes as one
stacked computation, like the multiplex engine (the "virtual SuperNodes on one device").
It reads the records as sent and writes each node's state into that node's `Context.state`.
Any other ClientApp gets one call per message, with its own copy of the records.

Deterministic: node ids are stable (a keyed hash of the partition id), listed in partition
order; node_config is `{"partition-id": i, "num-partitions": N}` as in Flower's simulation;
each per-message ClientApp call runs with the global `random` / numpy / torch RNGs seeded
from (seed, partition id, message count of that node) and the caller's RNG state restored
afterwards, so a node's randomness depends neither on the other nodes nor on the rank
layout, and the ServerApp's own draws are not disturbed. Same seed: bit-identical reruns,
and in-process == MPI for any number of ranks. Every message is counted (`count_bytes()` of
its records); a ClientApp exception becomes an error reply, as in Flower's runtimes.
"""

from __future__ import annotations

import logging
import random
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from fedsim import rng
from fedsim.flower import internals
from fedsim.flower.records import copy_content, message_bytes

NODE_PURPOSE = rng.purpose_id("flower-node")
CLIENT_RNG = rng.purpose_id("flower-client-rng")
BATCH_RNG = rng.purpose_id("flower-batch-rng")


def node_id_of(partition: int) -> int:
    """Stable Flower node id of partition `partition` (63-bit, never 0 or the SuperLink's 1)."""
    return (rng.key(0, NODE_PURPOSE, partition) >> 1) | (1 << 40)


def run_id_of(seed: int) -> int:
    return rng.key(seed, NODE_PURPOSE, -1) >> 1


@contextmanager
def seeded_globals(seed: int, purpose: int, *ids: int) -> Iterator[None]:
    """Run a block with `random`, numpy and torch (CPU) global RNGs seeded from
    (seed, purpose, ids), restoring the previous states afterwards."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    k = rng.key(seed, purpose, *ids)
    random.seed(k)
    np.random.seed(k & 0xFFFFFFFF)
    torch.default_generator.manual_seed(k & ((1 << 63) - 1))  # CPU only: no lazy CUDA calls
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def seed_globals(seed: int) -> None:
    """Seed the ServerApp's global RNGs (Flower's samplers use the `random` module)."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def _error_reply(msg: Message, exc: BaseException, log: bool = True) -> Message:
    """The error reply Flower's runtimes send for a ClientApp that raised (call in `except`)."""
    if log and not getattr(exc, "one_line", False):  # fedsim's ClientFailure says it all
        logging.getLogger("flwr").error("ClientApp of node %s raised:\n%s",
                                        msg.metadata.dst_node_id, traceback.format_exc())
    return Message(Error(code=internals.client_app_error_code(),
                         reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)


class NodeHost:
    """The nodes (one `Context` each) of partitions `partitions`, run by `client_app` here."""

    def __init__(self, client_app: Any, partitions: Iterable[int], num_nodes: int, *,
                 run_id: int, seed: int = 0, run_config: dict | None = None,
                 multiplex: bool = True) -> None:
        self.app, self.seed = client_app, seed
        self.batched = multiplex and callable(getattr(client_app, "handle_batch", None))
        self.contexts: dict[int, Context] = {}
        self.partition: dict[int, int] = {}
        self.calls: dict[int, int] = {}
        self.batches = 0
        for p in partitions:
            nid = node_id_of(p)
            self.partition[nid], self.calls[nid] = p, 0
            self.contexts[nid] = Context(run_id=run_id, node_id=nid,
                                         node_config={"partition-id": p, "num-partitions": num_nodes},
                                         state=RecordDict(), run_config=dict(run_config or {}))

    def deliver_all(self, batch: list[Message]) -> list[Message]:
        """The replies (same order) to `batch`, messages with their ids already set."""
        if not self.batched:
            return [self._stamp(self._one(m)) for m in batch]
        for m in batch:
            self.calls[m.metadata.dst_node_id] += 1
        self.batches += 1
        contexts = [self.contexts[m.metadata.dst_node_id] for m in batch]
        with seeded_globals(self.seed, BATCH_RNG, self.batches):
            try:
                replies = list(self.app.handle_batch(batch, contexts))
            except Exception as exc:  # noqa: BLE001 - the whole stacked computation failed: every node errs
                replies = [_error_reply(m, exc, log=j == 0) for j, m in enumerate(batch)]
        return [self._stamp(r) for r in replies]

    def _one(self, msg: Message) -> Message:
        """One ClientApp call on a fresh copy of the records, as if they had crossed a network."""
        nid = msg.metadata.dst_node_id
        self.calls[nid] += 1
        inbound = internals.copy_message(msg, copy_content(msg.content))
        with seeded_globals(self.seed, CLIENT_RNG, self.partition[nid], self.calls[nid]):
            try:
                return self.app(inbound, self.contexts[nid])
            except Exception as exc:  # noqa: BLE001 - Flower turns ClientApp exceptions into error replies
                return _error_reply(inbound, exc)

    @staticmethod
    def _stamp(reply: Message) -> Message:
        return internals.set_message_id(reply, "r" + reply.metadata.reply_to_message_id)


class InProcessGrid(Grid):
    """A deterministic Grid whose `num_nodes` nodes are ClientApp calls in this process.

    Args:
      client_app: the Flower `ClientApp` every node runs.
      num_nodes: number of nodes (partition ids 0..num_nodes-1).
      seed: keys the nodes' RNGs (see module docstring) and the run id.
      run_config: `context.run_config` of every node.
      partitions: the nodes this process hosts (default: all; `MpiGrid` passes rank 0's block).
      multiplex: hand a push's messages to a ClientApp with `handle_batch` in one call (False:
        one call per message, as Flower's runtimes do).

    `push_messages` gives each message its id (as Flower's Grids do) and returns the ids.
    """

    def __init__(self, client_app: Any, num_nodes: int, *, seed: int = 0,
                 run_config: dict | None = None, partitions: Iterable[int] | None = None,
                 multiplex: bool = True) -> None:
        self.num_nodes, self.seed = num_nodes, seed
        self._run = internals.new_run(run_id_of(seed))
        internals.set_task_identity(self._run.run_id)
        self.host = NodeHost(client_app, range(num_nodes) if partitions is None else partitions,
                             num_nodes, run_id=self._run.run_id, seed=seed, run_config=run_config,
                             multiplex=multiplex)
        self.node_ids = [node_id_of(p) for p in range(num_nodes)]
        self._known = set(self.node_ids)
        self._replies: dict[str, Message] = {}
        self._sent = 0
        self.bytes_down = self.bytes_up = self.messages = 0

    def set_run(self, run: Any) -> None:
        if not isinstance(run, internals.run_type()):
            raise TypeError(f"`run` must be a Flower Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        batch, sized = [], {}  # a content sent to many nodes is sized once
        for msg in messages:
            if msg.metadata.dst_node_id not in self._known or msg.metadata.reply_to_message_id:
                raise ValueError(f"invalid message for this grid: {msg.metadata}")
            self._sent += 1
            if msg.has_content() and id(msg.content) not in sized:
                sized[id(msg.content)] = message_bytes(msg)
            self.bytes_down += sized.get(id(msg.content), 0) if msg.has_content() else 0
            batch.append(internals.set_message_id(msg, f"{self._sent:012d}"))
        for reply in self._deliver(batch):
            self.bytes_up += message_bytes(reply)
            self.messages += 1
            self._replies[reply.metadata.reply_to_message_id] = reply
        return [m.metadata.message_id for m in batch]

    def _deliver(self, batch: list[Message]) -> list[Message]:
        return self.host.deliver_all(batch)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_server_app(server_app: Any, grid: InProcessGrid, run_config: dict | None = None) -> Context:
    """Run a Flower `ServerApp` against `grid` (as Flower's runtimes do); returns its Context."""
    internals.set_task_identity(grid.run.run_id)
    context = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=dict(run_config or {}))
    server_app(grid=grid, context=context)
    return context


def blocks(num_nodes: int, size: int) -> list[np.ndarray]:
    """Partition ids hosted by each MPI rank (contiguous blocks)."""
    return np.array_split(np.arange(num_nodes), size)


class MpiGrid(InProcessGrid):
    """`InProcessGrid` whose nodes live on MPI ranks (use on rank 0; others run `serve_mpi`).

    A push sends every rank its messages (pickled Flower Messages, one list per rank), delivers
    rank 0's own, then collects the replies rank by rank: ranks compute in parallel (each
    multiplexes its nodes when the ClientApp can), results are ordered.
    """

    TAG = 17

    def __init__(self, client_app: Any, num_nodes: int, comm: Any, **kw: Any) -> None:
        self.comm = comm
        self.owner = np.zeros(num_nodes, dtype=np.int64)
        for r, b in enumerate(blocks(num_nodes, comm.Get_size())):
            self.owner[b] = r
        super().__init__(client_app, num_nodes, partitions=blocks(num_nodes, comm.Get_size())[0],
                         **kw)
        self.rank_of = {node_id_of(p): int(self.owner[p]) for p in range(num_nodes)}

    def _deliver(self, batch: list[Message]) -> list[Message]:
        size = self.comm.Get_size()
        by_rank: list[list[Message]] = [[] for _ in range(size)]
        for m in batch:
            by_rank[self.rank_of[m.metadata.dst_node_id]].append(m)
        busy = [r for r in range(1, size) if by_rank[r]]
        for r in busy:
            self.comm.send(by_rank[r], dest=r, tag=self.TAG)
        replies = {0: self.host.deliver_all(by_rank[0]) if by_rank[0] else []}
        for r in busy:
            replies[r] = self.comm.recv(source=r, tag=self.TAG)
        order = {m.metadata.message_id: i for i, m in enumerate(batch)}
        flat = [x for r in sorted(replies) for x in replies[r]]
        return sorted(flat, key=lambda x: order[x.metadata.reply_to_message_id])

    def shutdown(self) -> None:
        """Release the serving ranks."""
        for r in range(1, self.comm.Get_size()):
            self.comm.send(None, dest=r, tag=self.TAG)


def serve_mpi(client_app: Any, num_nodes: int, comm: Any, *, seed: int = 0,
              run_config: dict | None = None, multiplex: bool = True) -> int:
    """Rank > 0: host this rank's block of nodes until rank 0 calls `MpiGrid.shutdown`."""
    run_id = run_id_of(seed)
    internals.set_task_identity(run_id)
    host = NodeHost(client_app, blocks(num_nodes, comm.Get_size())[comm.Get_rank()], num_nodes,
                    run_id=run_id, seed=seed, run_config=run_config, multiplex=multiplex)
    served = 0
    while (batch := comm.recv(source=0, tag=MpiGrid.TAG)) is not None:
        comm.send(host.deliver_all(batch), dest=0, tag=MpiGrid.TAG)
        served += len(batch)
    return served
