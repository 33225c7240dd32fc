"""Flat parameter vectors of a module, keyed initialisation, and the set-up check of its layers.

fedsim keeps the parameters of m clients as the rows of one [m, P] tensor. `ParamSpec` says
where each named parameter lives in a row; `init_params` draws rows with the module's own
initialisers under keyed seeds; `check_supported` rejects, at set-up, layers whose behaviour
no stacked execution can reproduce per client (running statistics, global-RNG dropout).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedsim import rng
from fedsim.errors import ConfigError


@dataclass(frozen=True)
class ParamSpec:
    """Where each named parameter of a module lives in the flat vector [P]."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int

    @staticmethod
    def of(module: nn.Module) -> ParamSpec:
        names, shapes, offsets, off = [], [], [], 0
        for name, p in module.named_parameters():
            names.append(name)
            shapes.append(tuple(p.shape))
            offsets.append(off)
            off += p.numel()
        return ParamSpec(tuple(names), tuple(shapes), tuple(offsets), off)

    def flatten(self, module: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def unflatten(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of x [..., P] shaped as the module's parameters (leading dims kept)."""
        lead = x.shape[:-1]
        return {n: x[..., o:o + math.prod(s)].view(*lead, *s)
                for n, s, o in zip(self.names, self.shapes, self.offsets, strict=True)}

    def segments(self) -> list[tuple[str, int, int]]:
        """(name, start, stop) of every parameter tensor in the flat vector."""
        return [(n, o, o + math.prod(s))
                for n, s, o in zip(self.names, self.shapes, self.offsets, strict=True)]


def init_params(module_factory: Callable[[], nn.Module], spec: ParamSpec, seed: int,
                ids: list[int] | None = None) -> torch.Tensor:
    """Initial flat parameters keyed by (seed, INIT[, id]): [P], or [len(ids), P] with one init per id.

    Uses the module's own initialisers under a private, keyed generator state (no global RNG
    is disturbed: `torch.random.fork_rng`).
    """
    def one(*key_ids: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.key(seed, rng.INIT, *key_ids) & ((1 << 63) - 1))
            return spec.flatten(module_factory())
    if ids is None:
        return one()
    return torch.stack([one(i) for i in ids])


_NORM_HINT = ("use nn.GroupNorm(num_groups, channels) or nn.LayerNorm instead (the built-in "
              "'resnet' model uses GroupNorm)")
_RNG_HINT = ("fedsim's random streams are keyed by (seed, round, client) and a dropout layer "
             "would draw from torch's global generator; remove it or set p=0")


def check_supported(module: nn.Module) -> None:
    """ConfigError naming the first layer that no stacked execution can run faithfully.

    Rejected: BatchNorm / SyncBatchNorm and InstanceNorm with running statistics (one buffer
    would be shared by every client), dropout with p > 0 (global-RNG masks), embeddings with
    `max_norm` (they rewrite the weights in the forward pass) or sparse gradients.
    """
    for name, mod in module.named_modules():
        where = f"layer '{name or '<root>'}' ({type(mod).__name__})"
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(f"{where} keeps running statistics (BatchNorm) that one stacked "
                              f"model would share across all clients; {_NORM_HINT}",
                              key="kind", value=type(mod).__name__)
        if isinstance(mod, nn.modules.instancenorm._InstanceNorm) and mod.track_running_stats:
            raise ConfigError(f"{where} tracks running statistics; set track_running_stats=False "
                              f"or {_NORM_HINT}", key="kind", value=type(mod).__name__)
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0:
            raise ConfigError(f"{where} has p={mod.p}: {_RNG_HINT}", key="kind", value=mod.p)
        if isinstance(mod, (nn.RNNBase, nn.MultiheadAttention)) and getattr(mod, "dropout", 0) > 0:
            raise ConfigError(f"{where} has dropout={mod.dropout}: {_RNG_HINT}", key="kind",
                              value=mod.dropout)
        if isinstance(mod, nn.Embedding) and (mod.max_norm is not None or mod.sparse):
            raise ConfigError(f"{where} uses max_norm or sparse gradients, which stacked training "
                              "cannot reproduce; use a plain nn.Embedding", key="kind",
                              value=type(mod).__name__)
