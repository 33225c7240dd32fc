"""The ServerApp side of talking to fedsim's nodes: join, partition ids, wire bytes, replies.

Shared by `fedsim.flower.adapter.FlowerAdapter` (fedsim strategies) and
`fedsim.flower.driver` (Flower strategy objects). Flower's node ids are random in a
deployment; a first `query` round, after every node has registered, sends each node the
resolved scenario and learns its `partition-id`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any, NamedTuple, cast

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsim.flower.records import message_bytes, stack_records
from fedsim.types import Tree


class Replies(NamedTuple):
    """The replies of one request, ascending by partition id."""

    pids: list[int]
    arrays: Tree          # every reply's "arrays" rows stacked: [m, ...] per key ({} if none)
    metrics: list[Any]    # each reply's "metrics" record ({} if none)


class Federation:
    """The nodes of a run: partition id <-> Flower node id, and the bytes Flower moved.

    Args:
      num_clients: nodes the scenario needs (the federation must have exactly that many).
      timeout: seconds to wait for nodes to register and for replies.
      device: where reply arrays are decoded to.
    """

    def __init__(self, num_clients: int, timeout: float, device: Any = "cpu") -> None:
        self.n, self.timeout, self.device = num_clients, timeout, device
        self.node_of: dict[int, int] = {}
        self.pid_of: dict[int, int] = {}
        self.wire = [0, 0]  # bytes down (server -> nodes), up (nodes -> server)
        self._sized: tuple[RecordDict | None, int] = (None, 0)

    def message(self, content: RecordDict, mtype: str, pid: int, server_round: int) -> Message:
        """A message to partition `pid` (counted in the downlink bytes; a content sent to
        many nodes is sized once)."""
        msg = Message(content=content, dst_node_id=self.node_of[pid], message_type=mtype,
                      group_id=str(server_round))
        if self._sized[0] is not content:
            self._sized = (content, message_bytes(msg))
        self.wire[0] += self._sized[1]
        return msg

    def count_down(self, msgs: Iterable[Message]) -> list[Message]:
        msgs = list(msgs)
        self.wire[0] += sum(message_bytes(m) for m in msgs)
        return msgs

    def count_up(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        self.wire[1] += sum(message_bytes(r) for r in replies)
        return replies

    def collect(self, replies: Iterable[Message], expected: np.ndarray) -> Replies:
        """The replies by partition id, checked against `expected`; an error reply raises."""
        rows, failed = [], []
        for r in self.count_up(replies):
            if r.has_error():
                failed.append(r)
                continue
            rows.append((self.pid_of[r.metadata.src_node_id], r.content))
        if failed:
            raise RuntimeError(self.failure_line(failed))
        rows.sort(key=lambda r: r[0])
        got = [p for p, _ in rows]
        if got != [int(p) for p in expected]:
            missing = sorted(set(int(p) for p in expected) - set(got))
            raise RuntimeError(f"no reply from partitions {missing[:10]} (timeout {self.timeout}s)")
        arrays = [c["arrays"] for _, c in rows if "arrays" in c]
        stacked = stack_records(arrays, self.device) if len(arrays) == len(rows) else {}
        return Replies(got, stacked, [c.get("metrics", {}) for _, c in rows])

    def failure_line(self, failed: list[Message]) -> str:
        """One line for error replies: the partition ids, the round and the error's last line
        (a Flower error reason is a whole traceback)."""
        pids = sorted(self.pid_of.get(r.metadata.src_node_id, -1) for r in failed)
        rounds = sorted({str(r.metadata.group_id) for r in failed})
        lines = [ln.strip() for ln in str(failed[0].error.reason).splitlines() if ln.strip()]
        tail = next((ln for ln in reversed(lines) if "failed in round" in ln), lines[-1] if lines else "")
        named = re.search(r"failed in round [^:]*: (.*)", tail)  # fedsim's own ClientFailure line
        err = named.group(1).rstrip("'\"> ") if named else tail
        who = ", ".join(map(str, pids[:10])) + (" ..." if len(pids) > 10 else "")
        return f"clients (partition ids) {who} failed in round {', '.join(rounds)}: {err}"

    def join(self, grid: Grid, text: str) -> None:
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
        content = RecordDict({"config": ConfigRecord({"scenario": text})})
        msgs = self.count_down(Message(content=content, dst_node_id=nid,
                                       message_type=MessageType.QUERY) for nid in nodes)
        for r in self.count_up(grid.send_and_receive(msgs, timeout=self.timeout)):
            if r.has_error():
                raise RuntimeError(f"Flower node {r.metadata.src_node_id} could not join: "
                                   f"{r.error.reason}")
            pid = int(cast(int, r.content["config"]["partition-id"]))
            self.node_of[pid], self.pid_of[r.metadata.src_node_id] = r.metadata.src_node_id, pid
        if sorted(self.node_of) != list(range(self.n)):
            raise RuntimeError(f"partition ids of the nodes are {sorted(self.node_of)[:10]}..., "
                               f"expected 0..{self.n - 1}")
