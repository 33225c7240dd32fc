"""Exact rewrites the engine applies to a model before executing it (never to the user's module).

`pool_before_relu`: in every `nn.Sequential`, a ReLU directly followed by a max-pool is run as
the max-pool followed by the ReLU. ReLU is monotone and piecewise exact, so
``maxpool(relu(z)) == relu(maxpool(z))`` bit for bit, and so are the gradients with respect to
z: where a window's maximum is positive both orders route its gradient to the same arg-max
(ReLU keeps the order of positive values and maps the rest below them); where it is <= 0 both
give 0 (ReLU's derivative at z <= 0 is 0 in PyTorch). The ReLU then runs on the pooled map
(a quarter of the elements for 2x2 pooling), forward and backward: on W6's CNN
(`benchmarks/models_run.py`) a client step takes ~25 % less time. The usual CNN blocks
(conv-ReLU-pool, e.g. McMahan et al. 2017's CNN, LEAF's FEMNIST CNN) all qualify.

The rewritten module shares its layers (and so parameter and buffer tensors and their names)
with the original; only the order of parameter-free layers changes. `functional_call` with the
original's parameter names therefore runs it unchanged.
"""

from __future__ import annotations

import copy

from torch import nn

_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
              nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def _commutes(act: nn.Module, pool: nn.Module) -> bool:
    return type(act) is nn.ReLU and isinstance(pool, _MAX_POOLS) and not pool.return_indices


def pool_before_relu(module: nn.Module) -> nn.Module:
    """`module`, or a copy of its container path with every (ReLU, max-pool) pair of an
    `nn.Sequential` swapped (module docstring). Layers are shared, never copied."""
    items = list(module._modules.items())
    changed = False
    if isinstance(module, nn.Sequential):
        i = 0
        while i + 1 < len(items):
            (_, a), (_, b) = items[i], items[i + 1]
            if a is not None and b is not None and _commutes(a, b):
                items[i], items[i + 1] = items[i + 1], items[i]
                changed, i = True, i + 2
            else:
                i += 1
    children = []
    for name, child in items:
        new = pool_before_relu(child) if child is not None else None
        changed = changed or new is not child
        children.append((name, new))
    if not changed:
        return module
    out = copy.copy(module)  # shares parameters, buffers and hooks; gets its own child table
    out._modules = dict(children)
    return out
