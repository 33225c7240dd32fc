"""Core types and the typed seams between the roles (strategy, engine, comm, scenario).

Shapes: P = number of model parameters (one flat vector per model), m = clients in the block
being processed (all participants of a round, a memory-bounded chunk of them, one MPI rank's
slice, or a single Flower ClientApp), N = all clients of the scenario.

A strategy never communicates, never loops over clients in Python, never reads the clock and
never touches global RNG state: the engine does those things. Adding a strategy touches
``strategies/`` only. The round itself (who takes part, the `RoundCtx`, default weights, the
staleness queue, the byte rule, the metrics line) is defined once, in `fedsim.round`; engines
are transports (`Comm`) and schedulers of client blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import torch

Tree = dict[str, torch.Tensor]
"""Named tensors. Client-side trees have a leading axis of size m (one row per client)."""

Weights = torch.Tensor | Tree
"""Aggregation weights: [m] for every payload key, or {payload key: [m]}."""


@dataclass(frozen=True)
class RoundCtx:
    """What a strategy may know about the round, for one block of m clients.

    Built only by `fedsim.round.make_ctx`. All tensors live on the device of the model.

    Attributes:
      round: 0-based round index.
      seed: the scenario's root seed (derive streams with `fedsim.rng`, purpose STRATEGY).
      ids: [m] int64 global client ids of this block, ascending.
      num_samples: [m] local dataset sizes of this block.
      weight: [m] default aggregation weights n_i / sum_{j in S} n_j (sum to 1 over all
        participants of the round, whatever block they are in).
      participants: [N] bool, who takes part this round (all blocks see the same mask).
      total_samples: [N] local dataset sizes of every client.
      num_clients: N.
      steps: [m] int64 local steps each client of the block takes this round when the
        scenario sets heterogeneous local work (`fedsim.work`), else None (the strategy's own
        count). Strategies pass it to `strategies.local.run_local` as the budget.
    """

    round: int
    seed: int
    ids: torch.Tensor
    num_samples: torch.Tensor
    weight: torch.Tensor
    participants: torch.Tensor
    total_samples: torch.Tensor
    num_clients: int
    steps: torch.Tensor | None = None

    @property
    def m(self) -> int:
        """Clients in this block."""
        return int(self.ids.shape[0])

    @property
    def num_participants(self) -> int:
        """Participants of the round (over all blocks)."""
        return int(self.participants.sum())


class Oracle(Protocol):
    """Stochastic gradients for a block of clients in one round (built by the engine).

    ``oracle(x, step)`` with x [m, P] returns (loss [m], grad [m, P]). The minibatch of
    client i at local step s is keyed by (seed, round, client id, s): calling twice with the
    same step gives the same samples (STORM/VR-style estimators rely on this).
    ``oracle.full(x)`` returns the full local-batch loss and gradient.
    """

    def __call__(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def full(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


LocalFn = Callable[[Tree, Tree, Oracle, RoundCtx], tuple[Tree, Tree, Tree]]
"""(server, clients, oracle, ctx) -> (payload, clients, info)."""


def model_rows(*keys: str) -> Callable[[int], dict[str, tuple[int, ...]]]:
    """A `Strategy.payload` spec: every key is one model-sized row [P] per client."""
    def spec(p: int) -> dict[str, tuple[int, ...]]:
        return {k: (p,) for k in keys}
    return spec


_delta_payload = model_rows("delta")


class Strategy(NamedTuple):
    """An algorithm as pure functions; state goes in and comes out, inputs are never mutated.

    Attributes:
      init_server: (x0 [P]) -> server Tree. Must contain `model_key` ("x") for comm="reduce";
        replicated on every MPI rank.
      init_clients: (x0 [P] or [m, P], ids [m]) -> client Tree with leading axis m. Called
        lazily on a client's first participation; must depend only on x0 and the ids.
      local: (server, clients, oracle, ctx) -> (payload, clients, info). Runs on a block of
        participants. `payload` holds the tensors sent up ([m, ...], shapes as `payload`
        declares); `info` may hold "loss" [m] (training loss for the metrics) and, when the
        payload is compressed, "sent_values" [m] (float values a real encoding sends per row)
        and "sent_bits" [m] (its other bits: indices, signs, exponents); see
        `fedsim.round.row_bytes` for the one byte rule.
      server_update: comm="reduce": (server, reduced, ctx) -> server, where
        reduced[k] = sum_i w_i[k] * payload_i[k] over all participants; `reduced` is {} for a
        round nobody took part in (the update decides what that means: FedAvg keeps x, MIFA
        still applies its table). ctx covers all participants of the round.
      node_update: comm="mix": (clients, mixed, ctx) -> clients, where mixed[k] rows are the
        neighbour combination of payload[k] (see `mixing`).
      weights: (server, ctx) -> [m] or {key: [m]}: aggregation weights per payload key;
        None means ctx.weight for every key.
      comm: "reduce" (server aggregation) or "mix" (gossip with neighbours).
      mixing: comm="mix": payload key -> "W" (mixing-matrix row, self included; default)
        or "mean" (uniform mean over in-neighbours, self excluded).
      broadcast: server keys sent down to clients each round (byte accounting, Flower).
      staleness: the server update of round t receives the reduction of round t - staleness
        (CO2: 1); rounds < staleness receive nothing (server_update is not called).
      model_key: key of the model in the server Tree ("reduce") or client Tree ("mix").
      payload: P -> {payload key: row shape}; what `local` sends (checked by
        `fedsim.testing.check_strategy`). Compressors use it to size their state.
      derived_keys: payload keys a real receiver computes from the others (gossip-var's
        variances): carried by the simulation, not counted as bytes.
      trains_locally: `local` runs local steps and honours `ctx.steps` (heterogeneous local
        work); False for one-gradient methods (gd, EF21), where a `work:` section is refused.
      local_steps: local steps per round (`local_steps`, `tau`), for the simulated system's
        planning (deadlines, over-selection); None: one gradient pass.
      metrics: (server, ctx) -> {name: float | None}: the strategy's own entries of the metrics
        line (DP-FedAvg's privacy spent), called at every evaluation with a ctx of that round
        (its selected participants) (`fedsim.round.strategy_metrics`); None: none.
      aggregate: comm="reduce": (server, rows, ctx) -> reduced, replacing the weighted sum when
        the reduction is not one (robust aggregation, `fedsim.robust`): rows[k] [M, ...] are the
        payload rows of EVERY participant of the round in ascending client id, ctx covers them
        all; engines then gather rows instead of summing them (`fedsim.round.gathered_reduce`).
        None: the weighted sum.
    """

    init_server: Callable[[torch.Tensor], Tree]
    init_clients: Callable[[torch.Tensor, torch.Tensor], Tree]
    local: LocalFn
    server_update: Callable[[Tree, Tree, RoundCtx], Tree] | None = None
    node_update: Callable[[Tree, Tree, RoundCtx], Tree] | None = None
    weights: Callable[[Tree, RoundCtx], Weights] | None = None
    comm: Literal["reduce", "mix"] = "reduce"
    mixing: Mapping[str, str] = {}
    broadcast: tuple[str, ...] = ("x",)
    staleness: int = 0
    model_key: str = "x"
    payload: Callable[[int], dict[str, tuple[int, ...]]] = _delta_payload
    derived_keys: tuple[str, ...] = ()
    trains_locally: bool = True
    local_steps: int | None = None
    metrics: Callable[[Tree, RoundCtx], Mapping[str, Any]] | None = None
    aggregate: Callable[[Tree, Tree, RoundCtx], Tree] | None = None


def no_clients(x0: torch.Tensor, ids: torch.Tensor) -> Tree:
    """`init_clients` for strategies without per-client state."""
    return {}


@dataclass(frozen=True)
class StrategyRuntime:
    """Facts about the simulation a strategy factory may ask for (keyword argument `runtime`).

    The registry passes it to factories that declare a `runtime` parameter (and only to them).

    Attributes:
      num_clients: N.
      segments: (name, start, stop) of every parameter tensor in the flat vector.
      num_samples: [N] local dataset sizes.
      probabilities: true long-run participation rates [N] when the pattern defines them
        (only oracle baselines such as `known-prob` may use them).
      seed: root seed.
      p_nominal: the configured per-client probabilities p_n of the pattern (what the FedAU
        reference code's oracle divides by; equals `probabilities` except for cyclic rounding).
    """

    num_clients: int
    segments: tuple[tuple[str, int, int], ...]
    num_samples: np.ndarray
    probabilities: np.ndarray | None = None
    seed: int = 0
    p_nominal: np.ndarray | None = None


# ---- compression -----------------------------------------------------------------------------

class Encoding(NamedTuple):
    """What a compressed row costs on the wire (turned into bytes by `fedsim.round`).

    Attributes:
      values: [m] float values each row sends (counted at the payload dtype's width).
      bits: [m] float64 other bits each row sends (indices, signs, exponents, levels).
      indices: [m, k] ascending kept coordinates when the row is sparse (a sparsifier's
        support; `chain` runs later stages on the kept values only), else None.
    """

    values: torch.Tensor
    bits: torch.Tensor
    indices: torch.Tensor | None = None


class Compressor(Protocol):
    """A stateful row-wise compression operator with a sender half and a receiver half.

    The sender half runs on every client row of a block, the receiver half on the server's
    weighted sum of the decoded rows (error feedback such as EF21 keeps state on both sides,
    as PyTorch's PowerSGD hook keeps its error buffers explicitly). Implementations:
    `strategies.compress` (operators) and `strategies.feedback` (EF14, EF21, EControl).
    """

    def init(self, rows: torch.Tensor) -> Tree:
        """Sender state of zero rows [m, d] (a Tree with leading axis m; {} if stateless)."""
        ...

    def compress(self, v: torch.Tensor, state: Tree, ctx: RoundCtx, stream: tuple[int, ...] = ()
                 ) -> tuple[torch.Tensor, Encoding, Tree]:
        """v [m, d] -> (decoded [m, d] as the receiver sees it, encoding, new sender state).

        Randomness is keyed by (seed, COMPRESS, *stream, round, client id, coordinate).
        """
        ...

    def init_receiver(self, row: torch.Tensor) -> Tree:
        """Receiver state for a zero row [d]."""
        ...

    def receive(self, reduced: torch.Tensor, state: Tree) -> tuple[torch.Tensor, Tree]:
        """Weighted sum of decoded rows [d] -> (the estimate the strategy uses [d], new state)."""
        ...


class LocalOptimizer(Protocol):
    """A client-side optimizer over stacked rows (`strategies.local`: sgd, momentum, adamw)."""

    def init(self, rows: torch.Tensor) -> Tree:
        """State of fresh rows [m, P] ({} if stateless)."""
        ...

    def update(self, y: torch.Tensor, g: torch.Tensor, state: Tree, lr: float
               ) -> tuple[torch.Tensor, Tree]:
        """One step on every row along g [m, P]: (new rows, new state)."""
        ...


# ---- the seams an engine is built from -------------------------------------------------------

class Participation(Protocol):
    """Who takes part in round t: a keyed, random-access bool mask [N]."""

    num_clients: int
    probabilities: np.ndarray | None  # long-run participation rates p_n [N] (oracle use only)
    p_nominal: np.ndarray | None      # the configured p_n (differs from the rate for cyclic)

    def mask(self, round: int) -> np.ndarray: ...


class MixingOperator(Protocol):
    """A sparse mixing matrix in CSR form (`topologies.mixing.MixingMatrix`)."""

    n: int
    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray


class Topology(Protocol):
    """Round -> graph, with mixing matrices per rule (`topologies.base.Topology`)."""

    n: int
    static: bool

    def mixing(self, round: int = 0, rule: str = "metropolis") -> Any: ...


class Pending(Protocol):
    """A reduction in flight: `wait()` returns the summed tree ({} if nobody contributed)."""

    def test(self) -> None: ...

    def wait(self) -> Tree: ...


class Comm(Protocol):
    """Transport of a round loop: sums over processes and neighbour exchange.

    `LocalComm` (one process holds every client) and `MPIComm` (ranks own contiguous slices)
    implement it; a rank with nothing to contribute passes None and joins with zeros.
    """

    rank: int
    size: int

    def allreduce(self, tree: Tree | None, channel: str = "default") -> Tree: ...

    def iallreduce(self, tree: Tree | None, channel: str = "default") -> Pending: ...

    def allreduce_scalars(self, values: torch.Tensor) -> torch.Tensor: ...

    def allreduce_max(self, values: torch.Tensor) -> torch.Tensor: ...

    def allgather(self, obj: Any) -> list[Any]: ...

    def mix(self, mixing: dict[str, torch.Tensor], payload: Tree, owned: torch.Tensor,
            ops: Mapping[str, str]) -> Tree: ...

    def progress(self) -> None:
        """Let reductions in flight progress (called between local steps)."""
        ...


OnEval = Callable[[dict[str, Any]], None]
Progress = Callable[[int, "dict[str, Any] | None"], None]


class Engine(Protocol):
    """How a built scenario is executed (`fedsim.engines`: multiplex, mpi, flower).

    `prepare` does the set-up that should not count as round time (data placement);
    `run` executes the rounds, calling `on_eval` with every metrics line; `is_root` is False
    on processes that must not write the run folder (MPI ranks > 0); `summary_extra` adds
    engine facts to summary.json.
    """

    name: str
    is_root: bool

    def prepare(self, setup: Any) -> None: ...

    def run(self, setup: Any, on_eval: OnEval, progress: Progress | None = None,
            control: Any = None) -> list[dict[str, Any]]:
        """Execute the rounds; `control` (`fedsim.checkpoint.Control`) checkpoints and stops."""
        ...

    def summary_extra(self) -> dict[str, Any]: ...
