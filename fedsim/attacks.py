"""Byzantine clients: a keyed fraction of the clients sends corrupted updates (scenario ``attack:``).

``attack: {kind: sign_flip, fraction: 0.2}`` makes k = round(fraction * N) clients Byzantine for
the whole run: the k clients with the smallest keyed uniforms u(seed, ATTACK, client), the same
set on every engine, rank and chunking. Every round, each of their model-sized payload rows
(every key whose row is [P]: FedAvg's delta, SCAFFOLD's delta and dc; not scalars such as
FedNova's a_i or DP's bits) is replaced before it leaves the client:

  sign_flip  v -> -scale v                     (Blanchard et al. 2017; Li et al. 2019, RSA)
  scale      v -> scale v                      (a boosted update)
  random     v -> std N(0, I), keyed by (seed, ATTACK, round, client, key, coordinate)

The attack wraps the strategy's `local` (`with_attack`), so the honest computation runs, then the
row is corrupted on the client itself: on the multiplex and MPI engines and on Flower nodes alike.
Byte counts are the honest encoding's (the corrupted row has the same size). Attacks apply to
fedsim's server strategies (comm="reduce").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, NamedTuple

import numpy as np
import torch
from annotated_types import Ge, Lt

from fedsim import rng
from fedsim.constraints import PositiveFloat
from fedsim.registry import Registry
from fedsim.types import Oracle, RoundCtx, Strategy, Tree

ATTACKS = Registry("attacks", builtins=("fedsim.attacks",), reserved=("num_clients", "seed"))

ByzantineFraction = Annotated[float, Ge(0), Lt(1)]
Corrupt = Callable[[torch.Tensor, RoundCtx, int], torch.Tensor]
"""(rows [m, P] of a block, ctx, stream = the key's index) -> corrupted rows [m, P]."""


class Attack(NamedTuple):
    """The Byzantine set [N] bool and how their rows are corrupted."""

    byzantine: np.ndarray
    corrupt: Corrupt


def byzantine_set(fraction: float, num_clients: int, seed: int) -> np.ndarray:
    """[N] bool: the round(fraction N) clients with the smallest u(seed, ATTACK, client)."""
    k = int(round(fraction * num_clients))
    out = np.zeros(num_clients, dtype=bool)
    if k:
        u = rng.uniform_np(seed, rng.ATTACK, np.arange(num_clients))
        out[np.argsort(u, kind="stable")[:k]] = True
    return out


@ATTACKS.register("none")
def none(*, num_clients: int, seed: int) -> Attack | None:
    """No Byzantine clients (the default)."""
    return None


@ATTACKS.register("sign_flip")
def sign_flip(*, fraction: ByzantineFraction = 0.2, scale: PositiveFloat = 1.0, num_clients: int,
              seed: int) -> Attack:
    """Byzantine clients send -scale times their honest rows.

    Args:
      fraction: share of Byzantine clients in [0, 1). scale: the flipped rows' factor.
    """
    return Attack(byzantine_set(fraction, num_clients, seed), lambda v, ctx, j: -scale * v)


@ATTACKS.register("scale")
def scale(*, fraction: ByzantineFraction = 0.2, scale: PositiveFloat = 10.0, num_clients: int,
          seed: int) -> Attack:
    """Byzantine clients send their honest rows times `scale`.

    Args:
      fraction: share of Byzantine clients in [0, 1). scale: the factor.
    """
    return Attack(byzantine_set(fraction, num_clients, seed), lambda v, ctx, j: scale * v)


@ATTACKS.register("random")
def random_updates(*, fraction: ByzantineFraction = 0.2, std: PositiveFloat = 1.0, num_clients: int,
           seed: int) -> Attack:
    """Byzantine clients send Gaussian noise N(0, std^2 I) instead of their rows (keyed).

    Args:
      fraction: share of Byzantine clients in [0, 1). std: the noise scale.
    """
    def corrupt(v: torch.Tensor, ctx: RoundCtx, j: int) -> torch.Tensor:
        coords = torch.arange(v.shape[1], device=v.device)
        return std * rng.normal_torch(seed, rng.ATTACK, ctx.round, ctx.ids[:, None], j, coords[None, :],
                                      device=v.device, dtype=v.dtype)
    return Attack(byzantine_set(fraction, num_clients, seed), corrupt)


def with_attack(strategy: Strategy, attack: Attack) -> Strategy:
    """`strategy` whose Byzantine clients corrupt their model-sized payload rows after `local`."""
    if strategy.comm != "reduce":
        raise ValueError("kind: attacks model Byzantine clients of a server strategy; gossip strategies "
                         "are not supported")
    table = torch.as_tensor(attack.byzantine)

    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        payload, new, info = strategy.local(server, clients, oracle, ctx)
        bad = table.to(ctx.ids.device)[ctx.ids]
        if not bool(bad.any()):
            return payload, new, info
        p = server[strategy.model_key].shape[-1]
        out = dict(payload)
        for j, k in enumerate(sorted(payload)):
            v = payload[k]
            if v.dim() == 2 and v.shape[1] == p:
                out[k] = torch.where(bad[:, None], attack.corrupt(v, ctx, j), v)
        return out, new, info

    return strategy._replace(local=local)


__all__ = ["ATTACKS", "Attack", "byzantine_set", "with_attack"]
