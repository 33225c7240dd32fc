"""FLOPs of a training step: the one counter of the codebase.

Used by the execution plan's cost model (`fedsim.plan`, FLOPs of one client's step) and by the
simulated clock (`fedsim.system.flops_per_sample`, compute seconds = FLOPs / client FLOP/s).

Counted (2 FLOPs per multiply-add, as `torch.utils.flop_counter`; biases, norms, activations
and the loss are not counted):

- forward hooks on `nn.Linear`, convolutions (grouped and transposed), `nn.LSTM` / `nn.GRU` /
  `nn.RNN` (every layer, direction and gate: 2 T gates h (input + h) per sequence) and
  `nn.MultiheadAttention` (projections and the attention products);
- `F.scaled_dot_product_attention`, `torch.matmul` / `@` and `torch.bmm` called outside those
  layers (a `TorchFunctionMode`: 4 B H L S E for attention's two products, the full L x S even
  when causal, as torch's counter does).

Backward = weight gradients (the forward FLOPs again) + input gradients (once more, only where
the layer's input requires grad: a first Linear or Conv on the data costs 2x its forward, a
later one 3x, so logistic regression costs 4 d C per sample, Kaplan et al. 2020's "6 N" for
deep nets). Recurrent layers and attention count 3x, except the input part of a first
recurrent layer on raw features.

torch's `FlopCounterMode` was the alternative; measured with torch 2.13 on CPU it counts 0 for
`nn.LSTM` / `nn.GRU` and for `F.scaled_dot_product_attention`, and entering it imports
torch._dynamo (4-8 s of set-up). A `TorchFunctionMode` imports nothing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


def _mult(inp: Any) -> float:
    """Forward + backward multiplier of a layer with weights: 3 when its input needs a gradient."""
    return 3.0 if isinstance(inp, torch.Tensor) and inp.requires_grad else 2.0


def _rnn(mod: nn.RNNBase, x: torch.Tensor) -> float:
    """Forward + backward FLOPs of a recurrent layer stack on x ([B, T, F], [T, B, F] or [T, F])."""
    tokens = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    gates = {"LSTM": 4, "GRU": 3}.get(mod.mode, 1)
    d, h = (2 if mod.bidirectional else 1), mod.hidden_size
    proj = getattr(mod, "proj_size", 0) or h  # LSTM with projections: the recurrent input is proj_size
    total = 0.0
    for layer in range(mod.num_layers):
        inp = mod.input_size if layer == 0 else proj * d
        f_in, f_hh = 2.0 * tokens * gates * h * inp * d, 2.0 * tokens * gates * h * proj * d
        total += (_mult(x) if layer == 0 else 3.0) * f_in + 3.0 * f_hh
    return total


def _mha(mod: nn.MultiheadAttention, args: tuple) -> float:
    """Forward + backward FLOPs of nn.MultiheadAttention(query, key, value); query [N, L, E]
    (batch_first), [L, N, E] or [L, E]."""
    q, k = args[0], args[1]

    def batch_len(t: torch.Tensor) -> tuple[int, int]:
        if t.dim() == 2:
            return 1, t.shape[0]
        return (t.shape[0], t.shape[1]) if mod.batch_first else (t.shape[1], t.shape[0])
    (n, length), (_, src) = batch_len(q), batch_len(k)
    e = mod.embed_dim
    proj = 2.0 * n * (2 * length * e * e + src * e * (mod.kdim + mod.vdim))  # q and out; k and v
    return 3.0 * (proj + 4.0 * n * length * src * e)


def layer_flops(mod: nn.Module, args: tuple, out: Any) -> float:
    """Forward + backward FLOPs of one call of `mod` (0 for layers not listed in the module doc)."""
    if isinstance(mod, nn.Linear):
        return _mult(args[0]) * 2.0 * out.numel() * mod.in_features
    if isinstance(mod, nn.modules.conv._ConvNd):
        k = math.prod(mod.kernel_size)
        if mod.transposed:
            return _mult(args[0]) * 2.0 * args[0].numel() * (mod.out_channels // mod.groups) * k
        return _mult(args[0]) * 2.0 * out.numel() * (mod.in_channels // mod.groups) * k
    if isinstance(mod, nn.RNNBase):
        return _rnn(mod, args[0])
    if isinstance(mod, nn.MultiheadAttention):
        return _mha(mod, args)
    return 0.0


def _function_flops(func: Any, args: tuple, kwargs: dict) -> float:
    """Forward + backward FLOPs of attention / matmul calls made outside counted layers."""
    if func is F.scaled_dot_product_attention:
        q, k = args[0], args[1] if len(args) > 1 else kwargs["key"]
        return 3.0 * 4.0 * q.numel() * k.shape[-2]  # QK^T and AV: 2 (L S E) each, per batch x head
    if func in (torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__):
        a, b = args[0], args[1]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() == 0 or b.dim() == 0:
            return 0.0
        out = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) if a.dim() > 2 and b.dim() > 2 else ()
        rows = a.shape[-2] if a.dim() > 1 else 1
        cols = b.shape[-1] if b.dim() > 1 else 1
        lead = math.prod(out) if out else math.prod(a.shape[:-2]) * math.prod(b.shape[:-2])
        grads = int(a.requires_grad) + int(b.requires_grad)
        return (1.0 + grads) * 2.0 * lead * rows * cols * a.shape[-1]
    return 0.0


class _Functions(TorchFunctionMode):
    """Counts `_function_flops` of every torch function called while it is active (inner calls
    of a handled function run with the mode off, so nothing is counted twice)."""

    def __init__(self, counter: FlopCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.counter.depth == 0:
            self.counter.total += _function_flops(func, args, kwargs)
        return func(*args, **kwargs)


class FlopCounter:
    """Forward + backward FLOPs of everything `module` computes inside the `with` block.

    >>> with FlopCounter(model) as fc:
    ...     loss = F.cross_entropy(model(x), y)
    >>> fc.total   # FLOPs of the forward pass and of the backward pass it implies
    """

    def __init__(self, module: nn.Module) -> None:
        self.module, self.total, self.depth = module, 0.0, 0
        self._handles: list[Any] = []
        self._mode = _Functions(self)

    def _pre(self, mod: nn.Module, args: tuple) -> None:
        self.depth += 1

    def _post(self, mod: nn.Module, args: tuple, out: Any) -> None:
        self.depth -= 1
        if self.depth == 0:  # a counted layer inside another counted layer is the outer one's
            self.total += layer_flops(mod, args, out)

    def __enter__(self) -> FlopCounter:
        counted = (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase, nn.MultiheadAttention)
        for mod in self.module.modules():
            if isinstance(mod, counted):
                self._handles += [mod.register_forward_pre_hook(self._pre),
                                  mod.register_forward_hook(self._post)]
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()


def step_flops(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Forward + backward FLOPs of one cross-entropy step of `module` on the batch (x [B, ...], y [B])."""
    with FlopCounter(module) as fc, torch.enable_grad():  # grad mode: which inputs need gradients
        F.cross_entropy(module(x), y)
    return fc.total
