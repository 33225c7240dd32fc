"""Core types: a strategy is a NamedTuple of pure functions over client-stacked flat tensors.

Shapes: P = number of model parameters (one flat vector per model), m = clients in the block
being processed (all participants of a round, a memory-bounded chunk of them, one MPI rank's
slice, or a single Flower ClientApp), N = all clients of the scenario.

A strategy never communicates, never loops over clients in Python, never reads the clock and
never touches global RNG state: the engine does those things. Adding a strategy touches
``strategies/`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, NamedTuple, Protocol

import torch

Tree = dict[str, torch.Tensor]
"""Named tensors. Client-side trees have a leading axis of size m (one row per client)."""


@dataclass(frozen=True)
class RoundCtx:
    """What a strategy may know about the round, for one block of m clients.

    Attributes:
      round: 0-based round index.
      seed: the scenario's root seed (derive streams with `fedsim.rng`, purpose STRATEGY).
      ids: [m] int64 global client ids of this block, ascending.
      num_samples: [m] local dataset sizes of this block.
      weight: [m] default aggregation weights n_i / sum_{j in S} n_j (sum to 1 over all participants).
      participants: [N] bool, who takes part this round (all blocks see the same mask).
      total_samples: [N] local dataset sizes of every client.
      num_clients: N.
    """

    round: int
    seed: int
    ids: torch.Tensor
    num_samples: torch.Tensor
    weight: torch.Tensor
    participants: torch.Tensor
    total_samples: torch.Tensor
    num_clients: int
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def m(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_participants(self) -> int:
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


class Strategy(NamedTuple):
    """An algorithm as pure functions; state goes in and comes out, inputs are never mutated.

    Attributes:
      init_server: (x0 [P]) -> server Tree. Must contain "x" (the global model) for
        comm="reduce"; replicated on every MPI rank.
      init_clients: (x0 [P], ids [m]) -> client Tree with leading axis m. Called lazily on a
        client's first participation; must depend only on x0 and the ids.
      local: (server, clients, oracle, ctx) -> (payload, clients, info). Runs on a block of
        participants. `payload` holds the tensors sent up ([m, ...]); `info` may hold
        "up_bits" [m] (bits a real encoding sends; default: dense payload size) and
        "loss" [m] (training loss for the metrics).
      server_update: comm="reduce": (server, reduced, ctx) -> server, where
        reduced[k] = sum_i w_i[k] * payload_i[k] over all participants.
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
    """

    init_server: Callable[[torch.Tensor], Tree]
    init_clients: Callable[[torch.Tensor, torch.Tensor], Tree]
    local: Callable[..., tuple[Tree, Tree, Tree]]
    server_update: Callable[[Tree, Tree, RoundCtx], Tree] | None = None
    node_update: Callable[[Tree, Tree, RoundCtx], Tree] | None = None
    weights: Callable[[Tree, RoundCtx], Any] | None = None
    comm: Literal["reduce", "mix"] = "reduce"
    mixing: Mapping[str, str] = {}
    broadcast: tuple[str, ...] = ("x",)
    staleness: int = 0
    model_key: str = "x"
    needs: tuple[str, ...] = ()
    """Runtime information the factory asked for and the engine must supply (documentation)."""


def no_clients(x0: torch.Tensor, ids: torch.Tensor) -> Tree:
    """`init_clients` for strategies without per-client state."""
    return {}


@dataclass(frozen=True)
class StrategyRuntime:
    """Facts about the simulation a strategy factory may ask for (keyword argument `runtime`).

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
    num_samples: Any
    probabilities: Any = None
    seed: int = 0
    p_nominal: Any = None
