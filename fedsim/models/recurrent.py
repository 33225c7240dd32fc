"""LSTM, GRU and Elman-RNN layers as functional cells over (optionally) client-stacked weights.

`run_rnn` computes what `nn.LSTM` / `nn.GRU` / `nn.RNN` compute, with PyTorch's gate order and
equations (torch.nn docs), on time-major inputs x [*lead, T, B, E] and weights [*lead, ...]:
`lead` is () for one model or (m,) for m clients at once. The input projection of all time
steps is one (batched) matmul; each step adds one recurrent matmul and the gate arithmetic.

Two users: the stacked plan calls it with lead (m,) from a client-folded leaf, and the vmap
plan swaps `nn.LSTM`/`nn.GRU`/`nn.RNN` for `FunctionalRNN` (same parameter names, lead ()),
whose plain tensor ops `torch.func.vmap` can batch (aten::lstm has no batching rule).
"""

from __future__ import annotations

import torch
from torch import nn

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _addmm(c: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """c + a @ w^T for a [n, k] / [m, n, k] and w [out, k] / [m, out, k] (c broadcastable)."""
    if a.dim() == 2:
        return torch.addmm(c, a, w.t())
    return torch.baddbmm(c, a, w.transpose(-1, -2))


def _layer(mode: str, x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
           b_ih: torch.Tensor | None, b_hh: torch.Tensor | None, h: torch.Tensor,
           c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One direction of one layer: x [*lead, T, B, E] -> (out [*lead, T, B, H], h_T, c_T)."""
    t, b = x.shape[-3], x.shape[-2]
    gh_bias = b_hh.unsqueeze(-2) if b_hh is not None else torch.zeros((), dtype=x.dtype, device=x.device)
    in_bias = b_ih if b_ih is not None else torch.zeros_like(w_ih[..., 0])
    if mode != "GRU" and b_hh is not None:
        in_bias = in_bias + b_hh  # LSTM and RNN add both biases to the gates
    gx = _addmm(in_bias.unsqueeze(-2), x.flatten(-3, -2), w_ih)
    steps = gx.unflatten(-2, (t, b)).unbind(-3)  # unbind: one backward for all steps
    outs = []
    for g_x in steps:
        if mode == "LSTM":
            assert c is not None  # run_rnn passes a cell state to LSTM layers
            g = _addmm(g_x, h, w_hh)
            i, f, gg, o = g.chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
            h = torch.sigmoid(o) * torch.tanh(c)
        elif mode == "GRU":
            g_h = _addmm(gh_bias, h, w_hh)
            xr, xz, xn = g_x.chunk(3, -1)
            hr, hz, hn = g_h.chunk(3, -1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h = (1 - z) * n + z * h
        else:
            pre = _addmm(g_x, h, w_hh)
            h = torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)
        outs.append(h)
    return torch.stack(outs, -3), h, c


def run_rnn(mode: str, x: torch.Tensor, weights: dict[str, torch.Tensor], *, layers: int,
            hidden: int, bidirectional: bool, hx: tuple[torch.Tensor, ...] | None = None
            ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A multi-layer (bi)directional RNN of `mode` ("LSTM", "GRU", "RNN_TANH", "RNN_RELU").

    Args:
      x: [*lead, T, B, E] time-major input.
      weights: `nn.LSTM`-named tensors (weight_ih_l0, weight_hh_l0, bias_ih_l0, ..., *_reverse),
        each with the leading dims `lead`.
      hx: initial (h0,) or (h0, c0), each [*lead, layers * D, B, hidden]; None means zeros.

    Returns:
      (out [*lead, T, B, D * hidden], (h_n,) or (h_n, c_n) with [*lead, layers * D, B, hidden]).
    """
    lead, b = x.shape[:-3], x.shape[-2]
    dirs = ("", "_reverse") if bidirectional else ("",)
    zeros = x.new_zeros(*lead, layers * len(dirs), b, hidden)
    h0 = hx[0] if hx is not None else zeros
    c0 = (hx[1] if hx is not None else zeros) if mode == "LSTM" else None
    h_n: list[torch.Tensor] = []
    c_n: list[torch.Tensor] = []
    for k in range(layers):
        outs = []
        for d, sfx in enumerate(dirs):
            j = k * len(dirs) + d
            w_ih, w_hh = weights[f"weight_ih_l{k}{sfx}"], weights[f"weight_hh_l{k}{sfx}"]
            b_ih, b_hh = weights.get(f"bias_ih_l{k}{sfx}"), weights.get(f"bias_hh_l{k}{sfx}")
            inp = x.flip(-3) if d else x
            out, h, c = _layer(mode, inp, w_ih, w_hh, b_ih, b_hh, h0[..., j, :, :],
                               c0[..., j, :, :] if c0 is not None else None)
            outs.append(out.flip(-3) if d else out)
            h_n.append(h)
            if c is not None:
                c_n.append(c)
        x = torch.cat(outs, -1) if len(outs) > 1 else outs[0]
    hs = (torch.stack(h_n, -3),)
    return x, hs + ((torch.stack(c_n, -3),) if mode == "LSTM" else ())


def rnn_mode(mod: nn.RNNBase) -> str | None:
    """The `run_rnn` mode of a torch recurrent module, or None if its options are unsupported."""
    if getattr(mod, "proj_size", 0) or mod.dropout:
        return None
    return {nn.LSTM: "LSTM", nn.GRU: "GRU"}.get(type(mod)) or (
        ("RNN_TANH" if mod.nonlinearity == "tanh" else "RNN_RELU") if type(mod) is nn.RNN else None)


class FunctionalRNN(nn.Module):
    """Drop-in for an nn.LSTM / nn.GRU / nn.RNN (same parameters and outputs) built from plain ops."""

    def __init__(self, mod: nn.RNNBase) -> None:
        super().__init__()
        mode = rnn_mode(mod)
        if mode is None:
            raise ValueError(f"unsupported recurrent options in {mod}")
        self.mode, self.layers, self.hidden = mode, mod.num_layers, mod.hidden_size
        self.bidirectional, self.batch_first = mod.bidirectional, mod.batch_first
        for name, p in mod.named_parameters():
            self.register_parameter(name, nn.Parameter(p.detach().clone()))

    def forward(self, x: torch.Tensor, hx: torch.Tensor | tuple[torch.Tensor, ...] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        state = None if hx is None else (hx,) if isinstance(hx, torch.Tensor) else tuple(hx)
        if state is not None and unbatched:
            state = tuple(s.unsqueeze(1) for s in state)
        out, hs = run_rnn(self.mode, x, dict(self.named_parameters()), layers=self.layers,
                          hidden=self.hidden, bidirectional=self.bidirectional, hx=state)
        out = out.squeeze(1) if unbatched else out.transpose(0, 1) if self.batch_first else out
        if unbatched:
            hs = tuple(s.squeeze(1) for s in hs)
        return out, (hs[0], hs[1]) if self.mode == "LSTM" else hs[0]
