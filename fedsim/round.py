"""The round kernel: what one round of a strategy means, written once for every engine.

Engines differ only in how blocks of clients are executed and how sums travel (`fedsim.types.Comm`);
everything a round *means* lives here and is called by the multiplex / MPI loop
(`fedsim.engines.loop`) and by the Flower adapter (`fedsim.flower.adapter`, `fedsim.flower.client`):

* `participants`: who takes part in round t (gossip: every node);
* `make_ctx`: the only constructor of a `RoundCtx` (default weights n_i / sum_S n_j);
* `client_step`: a block's local work, its training loss and its uplink bytes;
* `block_partial`: the block's share of the weighted sum (the strategy's weights or the default);
* `gathered_reduce`: the reduction of a strategy with an `aggregate` (robust aggregation), from
  the rows of every participant;
* `Staleness`: the FIFO that hands the server update of round t the reduction of t - s;
* `server_step`: the strategy's server update (not called while the FIFO fills);
* `row_bytes` / `broadcast_bytes`: the one byte rule;
* `MixingOps`: the round's mixing operators ("W" and the uniform neighbour mean "mean");
* `eval_due`, `metrics_line`, `node_metrics`, `strategy_metrics`: when to evaluate and the
  metrics line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from fedsim.comm import weighted_sum
from fedsim.types import Oracle, Participation, Pending, RoundCtx, Strategy, Topology, Tree
from fedsim.work import LocalWork, budget_tensor

# ---- who, and with which weights -------------------------------------------------------------


def participants(strategy: Strategy, participation: Participation | None, t: int,
                 num_clients: int) -> np.ndarray:
    """[N] bool: the participants of round t (gossip strategies: every node, every round)."""
    if strategy.comm == "mix" or participation is None:
        return np.ones(num_clients, dtype=bool)
    return np.asarray(participation.mask(t), dtype=bool)


def make_ctx(t: int, seed: int, ids: torch.Tensor, participants: torch.Tensor,
             sizes: torch.Tensor, dtype: torch.dtype, work: LocalWork | None = None) -> RoundCtx:
    """The `RoundCtx` of clients `ids` [m] in round t.

    Args:
      participants: [N] bool mask of the round; sizes: [N] local dataset sizes (on the device
        of `ids`); dtype: of the default weights (the model's); work: the scenario's
        heterogeneous local work (None: every strategy's own local steps).
    """
    n_i = sizes[ids]
    denom = sizes[participants].sum().to(dtype).clamp_min(1)
    return RoundCtx(round=t, seed=seed, ids=ids, num_samples=n_i, weight=n_i.to(dtype) / denom,
                    participants=participants, total_samples=sizes, num_clients=int(sizes.shape[0]),
                    steps=budget_tensor(work, t, ids))


# ---- the one byte rule -----------------------------------------------------------------------

def row_bytes(strategy: Strategy, payload: Tree, info: Tree) -> torch.Tensor:
    """[m] int64 bytes each row of `payload` sends up.

    Dense rows send every value of every payload key (but `strategy.derived_keys`) at the
    width of its dtype. A compressed payload reports its encoding in `info`: "sent_values"
    (float values, at the payload dtype's width) and "sent_bits" (index / sign / exponent bits).
    Bytes = ceil((values * width + other bits) / 8).
    """
    counted = [v for k, v in payload.items() if k not in strategy.derived_keys]
    if not counted:
        return torch.zeros(0, dtype=torch.int64)
    m, width = counted[0].shape[0], counted[0].element_size() * 8
    dense = sum(v[0].numel() for v in counted) if m else 0
    dev = counted[0].device
    values = info.get("sent_values", torch.full((m,), float(dense), dtype=torch.float64, device=dev))
    bits = values.double() * width + info.get("sent_bits", torch.zeros(m, dtype=torch.float64, device=dev))
    return torch.ceil(bits.double() / 8).to(torch.int64)


def broadcast_bytes(strategy: Strategy, server: Tree) -> int:
    """Bytes the server sends each participant: its `broadcast` keys, dense."""
    return sum(server[k].numel() * server[k].element_size() for k in strategy.broadcast if k in server)


# ---- one block of clients --------------------------------------------------------------------

class ClientStep(NamedTuple):
    """A block's local work: payload [m, ...], new client state, loss [m] or None, bytes up [m]."""

    payload: Tree
    clients: Tree
    loss: torch.Tensor | None
    up_bytes: torch.Tensor


def client_step(strategy: Strategy, server: Tree, clients: Tree, oracle: Oracle,
                ctx: RoundCtx) -> ClientStep:
    """Run `strategy.local` on one block and count what it sends."""
    payload, clients, info = strategy.local(server, clients, oracle, ctx)
    return ClientStep(payload, clients, info.get("loss"), row_bytes(strategy, payload, info))


def block_partial(strategy: Strategy, server: Tree, payload: Tree, ctx: RoundCtx) -> Tree:
    """sum over the block of w_i * payload_i (the strategy's `weights`, else ctx.weight)."""
    w = strategy.weights(server, ctx) if strategy.weights else ctx.weight
    return weighted_sum(payload, w)


def gathered_reduce(strategy: Strategy, server: Tree, rows: Tree, ctx: RoundCtx) -> Tree:
    """`strategy.aggregate` of the round's payload rows ({} when nobody took part).

    rows[k] [M, ...] hold every participant's row in ascending client id (engines gather them:
    chunks concatenated, MPI ranks' slices allgathered in rank order, Flower replies by
    partition id); ctx covers all M participants.
    """
    assert strategy.aggregate is not None, "gathered_reduce needs a strategy with an aggregate"
    if not rows:
        return {}
    return strategy.aggregate(server, rows, ctx)


class Staleness:
    """FIFO of reductions: round t's server update receives the reduction of round t - s.

    Entries are `fedsim.types.Pending` handles, so a transport can leave a reduction in
    flight (MPI's Iallreduce) until the round that consumes it.
    """

    def __init__(self, staleness: int) -> None:
        self.staleness = staleness
        self.queue: list[Pending] = []

    def push(self, pending: Pending) -> Tree | None:
        """Add round t's reduction; return the one round t's update receives (None: still filling)."""
        self.queue.append(pending)
        if len(self.queue) <= self.staleness:
            return None
        return self.queue.pop(0).wait()

    def drain(self) -> list[Tree]:
        """Wait for everything in flight (end of run): the reductions not yet applied."""
        return [p.wait() for p in self.queue]


def server_step(strategy: Strategy, server: Tree, reduced: Tree | None, ctx: RoundCtx) -> Tree:
    """The strategy's server update with `reduced` (None while a stale FIFO fills: unchanged)."""
    if reduced is None:
        return server
    assert strategy.server_update is not None, "comm='reduce' strategies need a server_update"
    return strategy.server_update(server, reduced, ctx)


# ---- gossip operators ------------------------------------------------------------------------

class MixingOps:
    """The round's mixing operators as sparse CSR tensors, cached per distinct graph.

    "W" is the topology's mixing matrix under the scenario's rule, "mean" the uniform
    in-neighbour mean (`topologies.mixing.neighbour_mean`); `degrees` [N] counts each node's
    neighbours (a node sends its payload once per neighbour).
    """

    def __init__(self, topology: Topology, rule: str, device: torch.device, dtype: torch.dtype) -> None:
        self.topology, self.rule, self.device, self.dtype = topology, rule, device, dtype
        self._key: int | None = None
        self.ops: dict[str, torch.Tensor] = {}
        self.degrees = torch.zeros(0, dtype=torch.int64)

    def at(self, t: int) -> dict[str, torch.Tensor]:
        from topologies.mixing import neighbour_mean

        key = 0 if self.topology.static else t
        if self._key != key:
            mm = self.topology.mixing(t, rule=self.rule)
            self.ops = {"W": mm.to_torch(self.device, self.dtype),
                        "mean": neighbour_mean(mm).to_torch(self.device, self.dtype)}
            self.degrees = torch.as_tensor(np.diff(mm.indptr) - 1, device=self.device)
            self._key = key
        return self.ops


# ---- counters and the metrics line -----------------------------------------------------------

@dataclass
class ByteCounter:
    """Cumulative bytes sent up (clients -> server, or node -> neighbour) and down."""

    up: int = 0
    down: int = 0
    per_round: list[tuple[int, int]] = field(default_factory=list)

    def add(self, up: int, down: int) -> None:
        self.up += int(up)
        self.down += int(down)
        self.per_round.append((int(up), int(down)))


def eval_due(t: int, every: int, rounds: int) -> bool:
    """Whether round t (0-based) ends with an evaluation: every `every` rounds and the last."""
    return (t + 1) % every == 0 or t + 1 == rounds


def metrics_line(t: int, loss_sum: float, loss_count: float, test: Any,
                 counter: ByteCounter) -> dict[str, Any]:
    """The metrics line every engine writes: round, train/test loss and accuracy, bytes.

    `loss_sum` / `loss_count` are over the participants since the last evaluation; `test` is
    `problem.evaluate(x[None])` of the evaluated model, or None (not evaluated here).
    """
    return {"round": t + 1,
            "train_loss": loss_sum / loss_count if loss_count > 0 else None,
            "test_loss": float(test[0][0]) if test else None,
            "test_accuracy": float(test[1][0]) if test and test[1] is not None else None,
            "bytes_up": counter.up, "bytes_down": counter.down}


def node_metrics(sq_dist_sum: float, acc_sum: float | None, n: int) -> dict[str, Any]:
    """Gossip metrics: consensus distance (mean squared distance of the node models to their
    average) and the mean of the nodes' test accuracies (None without accuracies)."""
    return {"consensus_distance": sq_dist_sum / n,
            "node_accuracy_mean": None if acc_sum is None else acc_sum / n}



def strategy_metrics(strategy: Strategy, server: Tree, ctx: RoundCtx) -> dict[str, Any]:
    """The strategy's own entries of the metrics line (`Strategy.metrics`, {} without one).

    `ctx` is the server-update ctx of the evaluated round (all its participants); values are
    plain floats (or None) so every engine writes the same JSON.
    """
    if strategy.metrics is None:
        return {}
    return {k: None if v is None else float(v) for k, v in strategy.metrics(server, ctx).items()}
