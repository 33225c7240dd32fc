"""Error feedback as compressor wrappers: EF14, EF21 and EControl compose with any strategy.

Each wraps an inner compressor (used in its contractive form) and keeps per-client state in the
sender half; EF21 and EControl also keep the aggregate on the receiver. In a scenario:
``compressor: {name: ef21, inner: {name: top_k, ratio: 0.01}}`` on any server strategy (its
uplink is compressed by `strategies.uplink.compress_uplink`); in Python
``ef21(inner=top_k(ratio=0.01))``.

References:
  Seide, Fu, Droppo, Li, Yu, "1-bit SGD", Interspeech 2014; Karimireddy, Rebjock, Stich, Jaggi,
  "Error Feedback Fixes SignSGD", ICML 2019, arXiv:1901.09847 (EF14).
  Richtárik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically Better, and Practically
  Faster Error Feedback", NeurIPS 2021, arXiv:2106.05203; Fatkhullin, Sokolov, Gorbunov, Li,
  Richtárik, "EF21 with Bells & Whistles", arXiv:2110.03294 (EF21-PP, EF21-SGD).
  Gao, Islamov, Stich, "EControl: Fast Distributed Optimization with Compression and Error
  Control", ICLR 2024, arXiv:2311.05645.
"""

from __future__ import annotations

from typing import Literal

import torch

from fedsim.constraints import NonNegativeFloat
from fedsim.types import Compressor, Encoding, RoundCtx, Tree
from strategies import COMPRESSORS
from strategies.compress import Stream, Transform, contractive, require_stateless

Init = Literal["dense", "compressed"]


def _empty_receiver(row: torch.Tensor) -> Tree:
    return {}


def _passthrough(reduced: torch.Tensor, state: Tree) -> tuple[torch.Tensor, Tree]:
    return reduced, state


def _tracking_receiver(rows: torch.Tensor) -> Tree:
    return {"g": torch.zeros_like(rows)}


def _track(reduced: torch.Tensor, state: Tree) -> tuple[torch.Tensor, Tree]:
    """Receiver of EF21 / EControl: g <- g + sum_i w_i c_i; the estimate is g."""
    g = state["g"] + reduced
    return g, {"g": g}


def _dense_first(fresh: torch.Tensor, dense: torch.Tensor, c: torch.Tensor, enc: Encoding
                 ) -> tuple[torch.Tensor, Encoding]:
    """Rows of a client's first message go uncompressed (every value, no other bits)."""
    d = float(c.shape[1])
    return (torch.where(fresh[:, None], dense, c),
            Encoding(torch.where(fresh, d, enc.values.double()), torch.where(fresh, 0.0, enc.bits)))


@COMPRESSORS.register("ef14")
def ef14(*, inner: Compressor) -> Transform:
    """Classic error feedback (EF14): send c_i = C(e_i + v_i), keep e_i <- e_i + v_i - c_i.

    e_i = 0 at a client's first participation and untouched while it is absent; the receiver
    gets the weighted sum of the c_i (the inner compressor's receiver).
    """
    require_stateless(inner, "inner", "error feedback wraps a plain compressor")
    comp = contractive(inner)  # type: ignore[arg-type]

    def init(rows: torch.Tensor) -> Tree:
        return {"e": torch.zeros_like(rows)}

    def compress(v: torch.Tensor, state: Tree, ctx: RoundCtx, stream: Stream = ()
                 ) -> tuple[torch.Tensor, Encoding, Tree]:
        u = state["e"] + v
        c, enc, _ = comp.compress(u, {}, ctx, stream)
        return c, enc, {"e": u - c}
    return Transform(init, compress, _empty_receiver, _passthrough, comp.alpha)


@COMPRESSORS.register("ef21")
def ef21(*, inner: Compressor, init: Init = "dense") -> Transform:
    """EF21: send c_i = C(v_i - g_i), keep g_i <- g_i + c_i; the receiver keeps g += sum_i w_i c_i.

    With fixed weights over all N clients (pi_i = n_i / n or 1/N) g == sum_i pi_i g_i, and
    clients that do not take part keep their g_i, which stays in g (EF21-PP, the paper's rule).
    `init`: "dense" sends a client's first message uncompressed (g_i^0 = v_i, as the reference
    code), "compressed" sends C(v_i) (also allowed by the paper).
    """
    require_stateless(inner, "inner", "error feedback wraps a plain compressor")
    comp = contractive(inner)  # type: ignore[arg-type]

    def init_state(rows: torch.Tensor) -> Tree:
        return {"g": torch.zeros_like(rows), "seen": rows.new_zeros(rows.shape[0])}

    def compress(v: torch.Tensor, state: Tree, ctx: RoundCtx, stream: Stream = ()
                 ) -> tuple[torch.Tensor, Encoding, Tree]:
        g = state["g"]
        c, enc, _ = comp.compress(v - g, {}, ctx, stream)
        if init == "dense":
            c, enc = _dense_first(state["seen"] == 0, v - g, c, enc)
        return c, enc, {"g": g + c, "seen": torch.ones_like(state["seen"])}
    return Transform(init_state, compress, _tracking_receiver, _track, comp.alpha)


@COMPRESSORS.register("econtrol")
def econtrol(*, inner: Compressor, eta: NonNegativeFloat = 0.1, init: Init = "dense") -> Transform:
    """EControl: EF21 plus a fed-back error e_i (Gao, Islamov, Stich 2024).

    Delta_i = C(eta e_i + v_i - h_i), e_i <- e_i + v_i - h_i - Delta_i, h_i <- h_i + Delta_i; the
    receiver keeps h += sum_i w_i Delta_i. eta = 0 with init "compressed" is EF21. The theory
    uses eta = alpha / 400; experiments tune it.
    """
    require_stateless(inner, "inner", "error feedback wraps a plain compressor")
    comp = contractive(inner)  # type: ignore[arg-type]

    def init_state(rows: torch.Tensor) -> Tree:
        return {"g": torch.zeros_like(rows), "e": torch.zeros_like(rows),
                "seen": rows.new_zeros(rows.shape[0])}

    def compress(v: torch.Tensor, state: Tree, ctx: RoundCtx, stream: Stream = ()
                 ) -> tuple[torch.Tensor, Encoding, Tree]:
        h, e = state["g"], state["e"]
        c, enc, _ = comp.compress(eta * e + v - h, {}, ctx, stream)
        if init == "dense":
            c, enc = _dense_first(state["seen"] == 0, v - h, c, enc)
        return c, enc, {"g": h + c, "e": e + v - h - c, "seen": torch.ones_like(state["seen"])}
    return Transform(init_state, compress, _tracking_receiver, _track, comp.alpha)


__all__ = ["ef14", "ef21", "econtrol"]
