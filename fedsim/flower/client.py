"""The ClientApp of a fedsim scenario: a Flower node = one client on its own partition.

Messages (built by `fedsim.flower.adapter.FlowerAdapter`, or by a Flower strategy object for
`strategy: {name: flower}`, see `fedsim.flower.node`):
  query          join: config["scenario"] (the resolved scenario YAML). The node builds the
                 scenario (cached per process), resets its strategy state, and replies with its
                 `partition-id` (from `context.node_config`, as Flower's simulation sets it).
  train          fedsim strategies: arrays = the server keys of `strategy.broadcast`, config =
                 round, participants; the node runs the kernel's `client_step` on its partition
                 (the multiplex engine's keyed minibatches) and replies arrays = payload row,
                 metrics = loss, num-examples, up-bytes (the kernel's byte rule).
                 Flower strategies: Flower's train message; local SGD, reply = the trained model.
  train.mix      (comm="mix") arrays: the payload rows of this node's in-neighbours; weights:
                 their mixing weights. The node mixes locally and runs `strategy.node_update`.
  evaluate       (comm="mix") the node's model row for central evaluation; (Flower strategies)
                 the model on the node's own data.

`FedsimClientApp.handle_batch` answers many nodes' messages in one call (fedsim's grids use it
to multiplex a round's local training); Flower's runtimes call the app once per message.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from flwr.app import ConfigRecord, Message
from flwr.clientapp import ClientApp

from fedsim.flower import node
from fedsim.flower.node import RUN_KEY, STATE_KEY, Options
from fedsim.types import Tree

__all__ = ["FedsimClientApp", "NodeScenario", "STATE_KEY", "built", "make_client_app",
           "register_setup", "scenario_text"]


@dataclass
class NodeScenario:
    """A scenario built in this process (shared by every node of the process)."""

    setup: Any
    text: str
    server0: Tree | None = None

    @property
    def flower_strategy(self) -> bool:
        """Whether a Flower strategy object drives the clients (`strategy.name: flower`)."""
        return self.setup.scenario.strategy.name == "flower"

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


def join(msgs: Sequence[Message], contexts: Sequence[Any], opts: Options) -> list[Message]:
    """Build the scenario, check each node's partition, reset the nodes' strategy state."""
    out = []
    for msg, context in zip(msgs, contexts, strict=True):
        text = str(msg.content["config"]["scenario"])
        sc = built(text)
        pid, n = int(context.node_config["partition-id"]), sc.setup.num_clients
        parts = int(context.node_config.get("num-partitions", n))
        if parts != n or not 0 <= pid < n:
            raise ValueError(f"node partition-id {pid} of num-partitions {parts} does not fit "
                             f"the scenario's {n} clients (run the federation with {n} nodes)")
        context.state[RUN_KEY] = ConfigRecord({"scenario": text})
        if STATE_KEY in context.state:
            del context.state[STATE_KEY]
        out.append(node.join_reply(msg, pid))
    return out


def _joined(contexts: Sequence[Any]) -> NodeScenario:
    """The one scenario the nodes of `contexts` have joined (RuntimeError otherwise)."""
    if any(RUN_KEY not in c.state for c in contexts):
        raise RuntimeError("fedsim node received work before joining (no query message)")
    text = str(contexts[0].state[RUN_KEY]["scenario"])
    if any(str(c.state[RUN_KEY]["scenario"]) != text for c in contexts[1:]):
        raise RuntimeError("the nodes of one push joined different scenarios")
    return built(text)


def _by_content(msgs: Sequence[Message], contexts: Sequence[Any], opts: Options,
                work: Callable[[node.Block, Options], list[Message]]) -> list[Message]:
    """Run `work` once per group of messages that share one content (one round's broadcast)."""
    groups: dict[int, list[int]] = {}
    for j, m in enumerate(msgs):
        groups.setdefault(id(m.content), []).append(j)
    out: list[Message | None] = [None] * len(msgs)
    for idx in groups.values():
        ctxs = [contexts[j] for j in idx]
        replies = work(node.block(_joined(ctxs), [msgs[j] for j in idx], ctxs), opts)
        for j, r in zip(idx, replies, strict=True):
            out[j] = r
    return out  # type: ignore[return-value]


def train(msgs: Sequence[Message], contexts: Sequence[Any], opts: Options) -> list[Message]:
    """One round of local training for each node (see `fedsim.flower.node`)."""
    def work(b: node.Block, o: Options) -> list[Message]:
        return node.train_flower(b, o) if b.scenario.flower_strategy else node.train_fedsim(b, o)
    return _by_content(msgs, contexts, opts, work)


def mix(msgs: Sequence[Message], contexts: Sequence[Any], opts: Options) -> list[Message]:
    """comm="mix": neighbour combination and `strategy.node_update` for each node."""
    return node.mix(node.block(_joined(contexts), msgs, contexts), opts)


def evaluate(msgs: Sequence[Message], contexts: Sequence[Any], opts: Options) -> list[Message]:
    """Gossip: each node's model row; Flower strategies: the model on each node's data."""
    def work(b: node.Block, o: Options) -> list[Message]:
        return node.evaluate_flower(b, o) if b.scenario.flower_strategy else node.model_rows(b, o)
    return _by_content(msgs, contexts, opts, work)


def state(msgs: Sequence[Message], contexts: Sequence[Any], opts: Options) -> list[Message]:
    """Checkpoints: each node's strategy state rows (`query.state`)."""
    return node.state_rows(node.block(_joined(contexts), msgs, contexts), opts)


def restore(msgs: Sequence[Message], contexts: Sequence[Any], opts: Options) -> list[Message]:
    """A resumed run: each node's strategy state rows put back (`query.restore`)."""
    return node.restore_rows(node.block(_joined(contexts), msgs, contexts), opts)


HANDLERS = {"query": join, "query.state": state, "query.restore": restore, "train": train,
            "train.mix": mix, "evaluate": evaluate}


class FedsimClientApp(ClientApp):
    """fedsim's ClientApp. Flower calls it once per message; fedsim's grids call
    `handle_batch` with every message of a push for their nodes (multiplexed training).

    Args:
      threads: torch intra-op threads in this process (None: keep).
      chunk_size, memory_mb: clients per stacked computation (as the multiplex engine's).
    """

    def __init__(self, threads: int | None = None, chunk_size: int | None = None,
                 memory_mb: int = 2048) -> None:
        super().__init__()
        self.threads, self.opts = threads, Options(chunk_size, memory_mb)
        for kind, fn in HANDLERS.items():
            category, _, action = kind.partition(".")
            register = getattr(self, "evaluate" if category == "evaluate" else category)
            (register(action) if action else register())(self._single(fn))

    def _single(self, fn: Callable[..., list[Message]]) -> Callable[[Message, Any], Message]:
        def handler(msg: Message, context: Any) -> Message:
            self._threads()
            with _naming_clients([msg], [context]):
                return fn([msg], [context], self.opts)[0]
        return handler

    def _threads(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def handle_batch(self, msgs: Sequence[Message], contexts: Sequence[Any]) -> list[Message]:
        """One reply per message (same order); messages of one kind are handled together."""
        self._threads()
        kinds: dict[str, list[int]] = {}
        for j, m in enumerate(msgs):
            kinds.setdefault(m.metadata.message_type, []).append(j)
        out: list[Message | None] = [None] * len(msgs)
        for kind, idx in kinds.items():
            if kind not in HANDLERS:
                raise ValueError(f"fedsim's ClientApp has no handler for message type {kind!r}")
            with _naming_clients([msgs[j] for j in idx], [contexts[j] for j in idx]):
                replies = HANDLERS[kind]([msgs[j] for j in idx], [contexts[j] for j in idx], self.opts)
            for j, r in zip(idx, replies, strict=True):
                out[j] = r
        return out  # type: ignore[return-value]


def make_client_app(threads: int | None = None, chunk_size: int | None = None,
                    memory_mb: int = 2048) -> FedsimClientApp:
    """The fedsim ClientApp (see `FedsimClientApp`)."""
    return FedsimClientApp(threads, chunk_size, memory_mb)


class ClientFailure(RuntimeError):
    """A node's work failed: one line naming the partition ids, the round and the error."""

    one_line = True  # the error reply carries it; no traceback in the log


@contextmanager
def _naming_clients(msgs: Sequence[Message], contexts: Sequence[Any]) -> Iterator[None]:
    """Re-raise an exception of the nodes' work as one `ClientFailure` line (multiplexed nodes
    fail together: every partition id of the push is named)."""
    try:
        yield
    except (ClientFailure, KeyboardInterrupt):
        raise
    except Exception as exc:
        pids = sorted(int(c.node_config.get("partition-id", -1)) for c in contexts)
        rounds = sorted({str(m.metadata.group_id) for m in msgs})
        first = (str(exc).strip().splitlines() or [""])[0]
        who = f"client (partition id) {pids[0]}" if len(pids) == 1 else \
            f"clients (partition ids) {', '.join(map(str, pids[:10]))}{' ...' if len(pids) > 10 else ''}"
        raise ClientFailure(f"{who} failed in round {', '.join(rounds)}: {type(exc).__name__}: "
                            f"{first}") from exc
