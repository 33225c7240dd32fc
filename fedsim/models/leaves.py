"""Client-folded layers: m clients' samples run as one batch of m*B through one module.

The stacked plan runs a *shadow* copy of the user's module on inputs whose batch axis holds
the samples of m clients, client-major (row i*B + b is client i's sample b). Parameter-free
code (activations, pooling, reshapes, residual adds, attention arithmetic, `x[:, -1]`) treats
each sample alone, so it runs unchanged. Every layer that owns parameters is replaced by a
`FoldedLeaf` that reads the m clients' weights [m, *shape] from the shared `Run` and applies
client i's weights to client i's rows: batched matmuls (`baddbmm`), grouped convolutions
(groups = m * groups), offset embedding lookups, per-client affine norms, and the batched
recurrent cells of `fedsim.models.recurrent`.

Where the batch axis sits in a layer's input (dim 0, or dim 1 for time-major recurrent inputs)
is recorded once by a probe pass whose batch size m*B matches no other axis.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.models.recurrent import rnn_mode, run_rnn


class AmbiguousBatch(Exception):
    """The probe's batch size equals another axis of some layer input: retry with another."""


class NoBatchAxis(Exception):
    """A layer saw an input without the batch axis (e.g. shared positions): cannot fold."""


@dataclass
class Run:
    """Per-call state shared by a shadow module's leaves."""

    params: dict[str, torch.Tensor] = field(default_factory=dict)
    m: int = 1
    probe_n: int | None = None  # set during the probe pass: the folded batch size m*B


class FoldedLeaf(nn.Module):
    """Base of the client-folded layers: parameter lookup and batch-axis bookkeeping."""

    def __init__(self, prefix: str, run: Run) -> None:
        super().__init__()
        self.prefix, self.run = prefix, run
        self.batch_dims: dict[int, int] = {}

    def p(self, name: str) -> torch.Tensor | None:
        return self.run.params.get(self.prefix + name)

    def w(self, name: str) -> torch.Tensor:
        """A parameter the layer always has (its weight)."""
        return self.run.params[self.prefix + name]

    def batch_dim(self, h: torch.Tensor) -> int:
        """The axis of `h` that holds the m*B folded samples (recorded by the probe)."""
        n = self.run.probe_n
        if n is not None:
            dims = [d for d, s in enumerate(h.shape) if s == n]
            if len(dims) > 1:
                raise AmbiguousBatch
            if not dims:
                raise NoBatchAxis(f"{self.prefix.rstrip('.') or 'layer'} gets an input {tuple(h.shape)} "
                                  "without the batch axis")
            self.batch_dims[h.dim()] = dims[0]
        return self.batch_dims.get(h.dim(), 0)


class Linear(FoldedLeaf):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m, bd, w, b = self.run.m, self.batch_dim(h), self.w("weight"), self.p("bias")
        h = h.movedim(bd, 0)
        hm = h.reshape(m, -1, h.shape[-1])
        wt = w.transpose(1, 2)
        out = torch.baddbmm(b.unsqueeze(1), hm, wt) if b is not None else torch.bmm(hm, wt)
        return out.view(*h.shape[:-1], w.shape[1]).movedim(0, bd)


class Conv(FoldedLeaf):
    """Conv1d / Conv2d with zero padding: one grouped convolution over the m clients."""

    def __init__(self, prefix: str, run: Run, mod: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__(prefix, run)
        self.fn = F.conv1d if isinstance(mod, nn.Conv1d) else F.conv2d
        self.stride, self.padding, self.dilation = mod.stride, mod.padding, mod.dilation
        self.groups = mod.groups

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m, w, b = self.run.m, self.w("weight"), self.p("bias")
        self.batch_dim(h)
        n, spatial = h.shape[0] // m, h.shape[2:]
        hb = h.reshape(m, n, -1, *spatial).transpose(0, 1).reshape(n, -1, *spatial)
        bias = b.reshape(-1) if b is not None else None
        out = self.fn(hb, w.reshape(-1, *w.shape[2:]), bias, self.stride, self.padding,
                      self.dilation, groups=m * self.groups)
        return out.view(n, m, -1, *out.shape[2:]).transpose(0, 1).reshape(m * n, -1, *out.shape[2:])


class Embedding(FoldedLeaf):
    def __init__(self, prefix: str, run: Run, mod: nn.Embedding) -> None:
        super().__init__(prefix, run)
        self.padding_idx = mod.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        m, w, bd = self.run.m, self.w("weight"), self.batch_dim(ids)
        ids = ids.movedim(bd, 0)
        v = w.shape[1]
        flat = ids.reshape(m, -1) + torch.arange(m, device=ids.device).unsqueeze(1) * v
        out = F.embedding(flat, w.reshape(m * v, -1))
        if self.padding_idx is not None:  # forward value kept, gradient of the padding row zero
            pad = (ids.reshape(m, -1) == self.padding_idx).unsqueeze(-1)
            out = torch.where(pad, out.detach(), out)
        return out.view(*ids.shape, -1).movedim(0, bd)


def _affine(y: torch.Tensor, m: int, w: torch.Tensor | None, b: torch.Tensor | None,
            r: int) -> torch.Tensor:
    """y * w_i + b_i on client i's rows of y (batch axis 0), with w and b [m, *shape].

    y is read as [m, rows, K, r]: K = w[i].numel() (a GroupNorm's channels, a LayerNorm's
    normalised shape) followed by r positions sharing one scale (spatial positions; 1 for
    LayerNorm, whose normalised axes are the trailing ones).
    """
    ref = w if w is not None else b
    if ref is None:
        return y
    k = ref[0].numel()
    ym = y.reshape(m, -1, k, r)
    view = (m, 1, k, 1)
    if w is not None:
        out = torch.addcmul(b.reshape(view), ym, w.reshape(view)) if b is not None else ym * w.reshape(view)
    else:
        assert b is not None
        out = ym + b.reshape(view)
    return out.view(y.shape)


class GroupNorm(FoldedLeaf):
    def __init__(self, prefix: str, run: Run, mod: nn.GroupNorm) -> None:
        super().__init__(prefix, run)
        self.groups, self.eps = mod.num_groups, mod.eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.batch_dim(h)
        y = F.group_norm(h, self.groups, None, None, self.eps)
        return _affine(y, self.run.m, self.p("weight"), self.p("bias"), h[0, 0].numel())


class LayerNorm(FoldedLeaf):
    def __init__(self, prefix: str, run: Run, mod: nn.LayerNorm) -> None:
        super().__init__(prefix, run)
        self.shape, self.eps = tuple(mod.normalized_shape), mod.eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        bd = self.batch_dim(h)
        y = F.layer_norm(h, self.shape, None, None, self.eps).movedim(bd, 0)
        return _affine(y, self.run.m, self.p("weight"), self.p("bias"), 1).movedim(0, bd)


class Recurrent(FoldedLeaf):
    """nn.LSTM / nn.GRU / nn.RNN over client-stacked weights (batched functional cells)."""

    def __init__(self, prefix: str, run: Run, mod: nn.RNNBase) -> None:
        super().__init__(prefix, run)
        mode = rnn_mode(mod)
        assert mode is not None  # `_leaf_for` folds supported recurrent layers only
        self.mode: str = mode
        self.names = [n for n, _ in mod.named_parameters()]
        self.layers, self.hidden = mod.num_layers, mod.hidden_size
        self.bidirectional, self.batch_first = mod.bidirectional, mod.batch_first

    def forward(self, x: torch.Tensor, hx: Any = None) -> tuple[torch.Tensor, Any]:
        if x.dim() != 3:
            raise NoBatchAxis(f"{self.prefix.rstrip('.')} gets an unbatched sequence")
        m, bd = self.run.m, 0 if self.batch_first else 1
        if self.run.probe_n is not None and x.shape[bd] != self.run.probe_n:
            raise NoBatchAxis(f"{self.prefix.rstrip('.')}: batch axis {bd} is not the folded batch")
        xt = x.movedim(bd, 0)  # [N, T, E]
        n = xt.shape[0] // m
        xs = xt.reshape(m, n, *xt.shape[1:]).transpose(1, 2)  # [m, T, B, E]
        state = None
        if hx is not None:
            hx = (hx,) if isinstance(hx, torch.Tensor) else tuple(hx)
            state = tuple(s.reshape(s.shape[0], m, n, -1).transpose(0, 1) for s in hx)
        weights = {k: t for k in self.names if (t := self.p(k)) is not None}
        out, hs = run_rnn(self.mode, xs, weights, layers=self.layers,
                          hidden=self.hidden, bidirectional=self.bidirectional, hx=state)
        out = out.transpose(1, 2).reshape(m * n, *out.shape[1:2], -1).movedim(0, bd)
        hs = tuple(s.transpose(0, 1).reshape(s.shape[1], m * n, -1) for s in hs)
        return out, hs if self.mode == "LSTM" else hs[0]


def _leaf_for(mod: nn.Module, prefix: str, run: Run) -> FoldedLeaf | None:
    """The folded replacement of a parameter-owning layer, or None if it has none."""
    if type(mod) is nn.Linear:
        return Linear(prefix, run)
    if isinstance(mod, nn.Conv1d | nn.Conv2d) and type(mod) in (nn.Conv1d, nn.Conv2d) \
            and mod.padding_mode == "zeros":
        return Conv(prefix, run, mod)
    if type(mod) is nn.Embedding:
        return Embedding(prefix, run, mod)
    if type(mod) is nn.GroupNorm:
        return GroupNorm(prefix, run, mod)
    if type(mod) is nn.LayerNorm:
        return LayerNorm(prefix, run, mod)
    if isinstance(mod, nn.RNNBase) and type(mod) in (nn.LSTM, nn.GRU, nn.RNN) and rnn_mode(mod) is not None:
        return Recurrent(prefix, run, mod)
    return None


def fold(module: nn.Module, run: Run) -> tuple[nn.Module | None, str]:
    """A shadow of `module` whose parameter-owning layers are folded leaves; (None, reason) if
    some parameter belongs to a layer that has no folded form."""
    names = {n for n, _ in module.named_parameters()}
    plan: dict[str, FoldedLeaf] = {}
    for name, mod in module.named_modules():
        local = [n for n, _ in mod.named_parameters(recurse=False)]
        if not local:
            continue
        pre = f"{name}." if name else ""
        leaf = _leaf_for(mod, pre, run)
        if leaf is None:
            return None, f"layer '{name or '<root>'}' ({type(mod).__name__}) has no stacked form"
        if any(pre + n not in names for n in local):
            return None, f"layer '{name}' shares (ties) parameters with another layer"
        plan[name] = leaf
    if "" in plan:
        return plan[""], ""
    shadow = copy.deepcopy(module)
    for name, leaf in plan.items():
        parent, _, attr = name.rpartition(".")
        setattr(shadow.get_submodule(parent) if parent else shadow, attr, leaf)
    if any(True for _ in shadow.parameters()):
        return None, "parameters outside the model's layers"
    return shadow, ""

