"""The round kernel: what one round of a strategy means, written once for every engine.

Engines differ only in how blocks of clients are executed and how sums travel (`fedsim.types.Comm`);
everything a round *means* lives here and is called by the multiplex / MPI loop
(`fedsim.engines.loop`) and by the Flower adapter (`fedsim.flower.adapter`, `fedsim.flower.client`):

* `participants`: who takes part in round t (gossip: every node; traces: who is online);
* `plan_round` / `block_steps`: the simulated system's dropouts, over-selection and deadlines,
  and each client's local-step budget (heterogeneous work, deadline caps);
* `async_durations`: planned seconds of asynchronous clients (`fedsim.asynchrony`, FedBuff);
* `make_ctx`: the only constructor of a `RoundCtx` (default weights n_i / sum_S n_j);
* `client_step`: a block's local work (through a sample-counting oracle), its training loss,
  its uplink bytes and the samples its gradients touched;
* `record_times`: a block's simulated compute and communication seconds (`fedsim.system`);
* `block_partial`: the block's share of the weighted sum (the strategy's weights or the default);
* `gathered_reduce`: the reduction of a strategy with an `aggregate` (robust aggregation), from
  the rows of every participant;
* `Staleness`: the FIFO that hands the server update of round t the reduction of t - s;
* `server_step`: the strategy's server update (not called while the FIFO fills);
* `row_bytes` / `broadcast_bytes`: the one byte rule;
* `MixingOps`: the round's mixing operators ("W" and the uniform neighbour mean "mean");
* `eval_due`, `evaluation`, `metrics_line`, `node_metrics`, `strategy_metrics`: when to
  evaluate and the metrics line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from fedsim.client_metrics import client_metrics, client_test_sums
from fedsim.comm import weighted_sum
from fedsim.system import Clock, Plan, RoundRecord, SystemModel
from fedsim.types import Oracle, Participation, Pending, RoundCtx, Strategy, Topology, Tree
from fedsim.work import LocalWork, budget_tensor

# ---- who, and with which weights -------------------------------------------------------------


def participants(strategy: Strategy, participation: Participation | None, t: int,
                 num_clients: int, clock: Clock | None = None) -> np.ndarray:
    """[N] bool: the participants of round t (gossip strategies: every node, every round).

    A clock-driven pattern (an availability trace, `fedsim.participation_trace`) gives the
    clients online at `clock.now`; if nobody is, the clock waits for the next one to come online.
    """
    if strategy.comm == "mix" or participation is None:
        return np.ones(num_clients, dtype=bool)
    online = getattr(participation, "online", None)
    if online is None:
        return np.asarray(participation.mask(t), dtype=bool)
    now = clock.now if clock is not None else 0.0
    mask = np.asarray(online(now), dtype=bool)
    nxt = None if mask.any() or clock is None else participation.next_online(now)  # type: ignore[attr-defined]
    if nxt is not None:
        clock.wait(nxt - now)  # type: ignore[union-attr]
        mask = np.asarray(online(nxt), dtype=bool)
    return mask


def clock_driven(participation: Participation | None) -> bool:
    """Whether the pattern reads the simulated clock (so the clock must be current each round)."""
    return bool(getattr(participation, "clock_driven", False))


def plan_round(strategy: Strategy, system: SystemModel, work: LocalWork | None, t: int,
               mask: np.ndarray, sizes: np.ndarray, batch_size: int | None, server: Tree,
               num_params: int) -> Plan:
    """Round t's kept participants and local-step caps (the same on every process).

    Planned local steps are the work budget, else the strategy's `local_steps` (1 for one-pass
    gradient methods); a step touches a minibatch (or the local data); the download is the
    broadcast, the planned upload the dense payload.
    """
    if strategy.comm == "mix":
        return Plan(mask, None)
    steps, step_samples = planned_work(strategy, work, t, sizes, batch_size)
    return system.plan(t, mask, steps, step_samples, broadcast_bytes(strategy, server),
                       dense_row_bytes(strategy, server, num_params))


def planned_work(strategy: Strategy, work: LocalWork | None, t: int, sizes: np.ndarray,
                 batch_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """([N] planned local steps, [N] samples of one step) in round t (see `plan_round`)."""
    n = len(sizes)
    steps = work.steps(t, np.arange(n)) if work is not None else None
    if steps is None:
        steps = np.full(n, strategy.local_steps or 1, dtype=np.int64)
    step_samples = np.full(n, float(batch_size)) if batch_size else sizes.astype(np.float64)
    return steps, step_samples


def async_durations(strategy: Strategy, system: SystemModel, work: LocalWork | None, t: int,
                    ids: np.ndarray, sizes: np.ndarray, batch_size: int | None, server: Tree,
                    num_params: int) -> tuple[np.ndarray, np.ndarray]:
    """Planned (compute [m], download + upload [m]) seconds of clients `ids` starting from model
    version t (asynchronous aggregation, `fedsim.asynchrony`): the same on every process."""
    steps, step_samples = planned_work(strategy, work, t, sizes, batch_size)
    compute = system.compute_seconds(t, ids, steps[ids] * step_samples[ids])
    up = np.full(len(ids), dense_row_bytes(strategy, server, num_params))
    return compute, system.down_seconds(ids, broadcast_bytes(strategy, server)) + system.up_seconds(ids, up)


def block_steps(plan: Plan, work: LocalWork | None, strategy: Strategy, t: int,
                ids: torch.Tensor) -> torch.Tensor | None:
    """[m] local steps of a block: the work budget capped by the deadline (None: neither)."""
    budget = budget_tensor(work, t, ids)
    if plan.caps is None:
        return budget
    caps = torch.as_tensor(plan.caps, device=ids.device)[ids]
    nominal = budget if budget is not None else torch.full_like(caps, strategy.local_steps or 1)
    return torch.minimum(nominal, caps)


def make_ctx(t: int, seed: int, ids: torch.Tensor, participants: torch.Tensor,
             sizes: torch.Tensor, dtype: torch.dtype, steps: torch.Tensor | None = None) -> RoundCtx:
    """The `RoundCtx` of clients `ids` [m] in round t.

    Args:
      participants: [N] bool mask of the round; sizes: [N] local dataset sizes (on the device
        of `ids`); dtype: of the default weights (the model's); steps: [m] local-step budgets
        (`block_steps`; None: every strategy's own local steps).
    """
    n_i = sizes[ids]
    denom = sizes[participants].sum().to(dtype).clamp_min(1)
    return RoundCtx(round=t, seed=seed, ids=ids, num_samples=n_i, weight=n_i.to(dtype) / denom,
                    participants=participants, total_samples=sizes, num_clients=int(sizes.shape[0]),
                    steps=steps)


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


def dense_row_bytes(strategy: Strategy, server: Tree, num_params: int) -> float:
    """Bytes of one dense payload row (the declared payload at the model's width)."""
    width = next(iter(server.values())).element_size() if server else 4
    spec = strategy.payload(num_params)
    return float(sum(math.prod(s) for k, s in spec.items() if k not in strategy.derived_keys) * width)


# ---- one block of clients --------------------------------------------------------------------

class CountingOracle:
    """The problem's gradients for a block, counting the samples each row's gradients touch.

    A minibatch gradient touches the minibatch of rows still within their local-step budget
    (`ctx.steps`), a full gradient the row's local data; `progress` runs before every gradient
    (MPI lets reductions in flight progress).
    """

    def __init__(self, grads: Oracle, ctx: RoundCtx, batch_size: int | None,
                 progress: Callable[[], None] | None = None) -> None:
        self.grads, self.steps, self.progress = grads, ctx.steps, progress
        self.sizes = ctx.num_samples.double()
        self.batch = self.sizes if batch_size is None else torch.full_like(self.sizes, float(batch_size))
        self.samples = torch.zeros_like(self.sizes)

    def __call__(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.progress is not None:
            self.progress()
        live = self.batch if self.steps is None else torch.where(self.steps > step, self.batch, 0.0)
        self.samples = self.samples + live
        return self.grads(x, step)

    def full(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.progress is not None:
            self.progress()
        self.samples = self.samples + self.sizes
        return self.grads.full(x)


class ClientStep(NamedTuple):
    """A block's local work: payload [m, ...], new client state, loss [m] or None, bytes up [m],
    and the samples [m] its gradients touched (simulated compute)."""

    payload: Tree
    clients: Tree
    loss: torch.Tensor | None
    up_bytes: torch.Tensor
    samples: torch.Tensor


def client_step(strategy: Strategy, server: Tree, clients: Tree, problem: Any, ctx: RoundCtx,
                progress: Callable[[], None] | None = None) -> ClientStep:
    """Run `strategy.local` on one block with `problem`'s gradients and count what it did."""
    oracle = CountingOracle(problem.oracle(ctx.ids, ctx.round), ctx, getattr(problem, "batch_size", None),
                            progress)
    payload, clients, info = strategy.local(server, clients, oracle, ctx)
    return ClientStep(payload, clients, info.get("loss"), row_bytes(strategy, payload, info),
                      oracle.samples)


def record_times(record: RoundRecord, system: SystemModel, strategy: Strategy, t: int,
                 ids: np.ndarray, samples: np.ndarray, up_bytes: np.ndarray, down_bytes: float,
                 degrees: np.ndarray | None = None) -> None:
    """Add a block's simulated seconds to the round's record (`fedsim.system`).

    Star: download + compute + upload per client; all-reduce networks: compute only (the
    collective is timed once per round); gossip: compute + the parallel sends to neighbours.
    """
    compute = system.compute_seconds(t, ids, samples)
    if strategy.comm == "mix":
        comm = system.exchange_seconds(ids, up_bytes, degrees if degrees is not None else np.ones(len(ids)))
    elif system.cfg.network == "allreduce":
        comm = np.zeros(len(ids))
    else:
        comm = system.down_seconds(ids, down_bytes) + system.up_seconds(ids, up_bytes)
    record.add(compute, comm, up_bytes)


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
        """Wait for everything in flight (end of run): the reductions not yet applied (taken
        out of the FIFO)."""
        out, self.queue = [p.wait() for p in self.queue], []
        return out


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
                 counter: ByteCounter, sim_time: float) -> dict[str, Any]:
    """The metrics line every engine writes: round, train/test loss and accuracy, bytes and
    the simulated seconds since the start (`sim_time_s`).

    `loss_sum` / `loss_count` are over the participants since the last evaluation; `test` is
    `problem.evaluate(x[None])` of the evaluated model, or None (not evaluated here).
    """
    return {"round": t + 1,
            "train_loss": loss_sum / loss_count if loss_count > 0 else None,
            "test_loss": float(test[0][0]) if test else None,
            "test_accuracy": float(test[1][0]) if test and test[1] is not None else None,
            "bytes_up": counter.up, "bytes_down": counter.down, "sim_time_s": sim_time}


def node_metrics(sq_dist_sum: float, acc_sum: float | None, n: int) -> dict[str, Any]:
    """Gossip metrics: consensus distance (mean squared distance of the node models to their
    average) and the mean of the nodes' test accuracies (None without accuracies)."""
    return {"consensus_distance": sq_dist_sum / n,
            "node_accuracy_mean": None if acc_sum is None else acc_sum / n}



def evaluation(problem: Any, x: torch.Tensor, ids: torch.Tensor, n: int, *,
               models_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
               allreduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
               here: bool = True) -> tuple[Any, dict[str, Any]]:
    """The metrics line's test figures: (`test` for `metrics_line`, the per-client metrics).

    Args:
      x: [P] the evaluated model (the server model; gossip: the nodes' average), scored on the
        test set (`problem.evaluate(x[None])`) where `here` (rank 0; None elsewhere).
      ids: the clients this process holds; every client is scored on its own test split
        (`fedsim.client_metrics.client_metrics`: mean, weighted mean, worst-10 %, percentiles
        and spread of client accuracy, client loss; {} without per-client test splits).
      models_of: client ids -> the models they are scored with (gossip: each node's own
        model); None: x for every client.
      allreduce: sums the [3, N] per-client table over processes (MPI ranks), so every engine
        reports the same figures.

    When every client is scored by x and the clients' test splits partition the test set
    (`problem.client_test_covers`: natural splits of LEAF-style data), the test loss and
    accuracy are that table's totals, sum loss / sum count and sum correct / sum count: one
    pass over the test rows instead of two, on every process.
    """
    if models_of is None:  # x for every client: all of them in one pass over their test rows
        sums = client_test_sums(problem, lambda c: x.expand(c.numel(), -1), ids, n, max(ids.numel(), 1))
    else:
        sums = client_test_sums(problem, models_of, ids, n)
    if sums is not None and allreduce is not None:
        sums = allreduce(sums.reshape(-1)).reshape(3, n)
    total = 0.0 if sums is None else float(sums[1].sum())
    if models_of is None and total > 0 and getattr(problem, "client_test_covers", False):
        assert sums is not None
        test: Any = ((sums[2].sum() / total).reshape(1), (sums[0].sum() / total).reshape(1))
    else:
        test = problem.evaluate(x[None]) if here else None
    return test, {} if sums is None else client_metrics(sums[0], sums[1], sums[2])


def strategy_metrics(strategy: Strategy, server: Tree, participation: Participation | None, t: int,
                     seed: int, sizes: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """The strategy's own entries of the metrics line of round t (`Strategy.metrics`, {} without).

    The strategy sees a ctx of round t covering its selected participants (`participants`);
    values are plain floats (or None) so every engine writes the same JSON.
    """
    if strategy.metrics is None:
        return {}
    mask = torch.as_tensor(participants(strategy, participation, t, int(sizes.shape[0])), device=sizes.device)
    ctx = make_ctx(t, seed, torch.nonzero(mask).flatten(), mask, sizes, dtype)
    return {k: None if v is None else float(v) for k, v in strategy.metrics(server, ctx).items()}
