"""Built-in models for token sequences: char-lstm, char-gru, transformer.

Input: token ids [B, T] (int64). Output: logits [B, num_classes] of the token that follows the
sequence (LEAF Shakespeare's next-character task: classification on the last position), or of
the sequence's class for text classification (then set `vocab` to the input vocabulary size).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedsim.errors import ConfigError
from fedsim.models.registry import MODELS

Positive = Annotated[int, Field(gt=0)]


def _sequence_length(name: str, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 1:
        raise ConfigError(f"{name} needs token-id sequences [T] (a text dataset)", key="kind",
                          value=list(input_shape))
    return input_shape[0]


class CharRNN(nn.Module):
    """Embedding -> stacked LSTM/GRU (batch-first) -> Linear on the last position."""

    def __init__(self, cell: Callable[..., nn.RNNBase], vocab: int, embed: int, hidden: int, layers: int,
                 num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = cell(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(ids))
        return self.head(out[:, -1])


@MODELS.register("char-lstm")
def char_lstm(*, input_shape: tuple[int, ...], num_classes: int, embed: Positive = 8,
              hidden: Positive = 256, layers: Positive = 2, vocab: Positive | None = None) -> nn.Module:
    """LEAF's Shakespeare model: Embedding(vocab, 8) -> 2 x LSTM 256 -> Linear(256, classes).

    Caldas et al., "LEAF: A Benchmark for Federated Settings", arXiv:1812.01097
    (`models/shakespeare/stacked_lstm.py`), after McMahan et al. 2017's character LSTM.
    `vocab` defaults to `num_classes` (next-character prediction over one alphabet).
    """
    _sequence_length("char-lstm", input_shape)
    return CharRNN(nn.LSTM, vocab or num_classes, embed, hidden, layers, num_classes)


@MODELS.register("char-gru")
def char_gru(*, input_shape: tuple[int, ...], num_classes: int, embed: Positive = 8,
             hidden: Positive = 256, layers: Positive = 2, vocab: Positive | None = None) -> nn.Module:
    """char-lstm with GRU cells (Cho et al. 2014): Embedding -> layers x GRU -> Linear."""
    _sequence_length("char-gru", input_shape)
    return CharRNN(nn.GRU, vocab or num_classes, embed, hidden, layers, num_classes)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)); causal self-attention."""

    def __init__(self, d: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CausalTransformer(nn.Module):
    """Token + learned position embeddings, `layers` pre-norm blocks, LayerNorm, head on the last position."""

    def __init__(self, vocab: int, num_classes: int, context: int, d: int, heads: int, layers: int,
                 mlp: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*(Block(d, heads, mlp) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, num_classes)
        for name, p in self.named_parameters():  # GPT-2 initialisation (Radford et al. 2019)
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias") and "ln" not in name:
                nn.init.zeros_(p)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        pos = torch.arange(t, device=ids.device).expand(b, t)  # a batch axis, so layers fold
        h = self.blocks(self.tok(ids) + self.pos(pos))
        return self.head(self.ln(h[:, -1]))


@MODELS.register("transformer")
def transformer(*, input_shape: tuple[int, ...], num_classes: int, layers: Positive = 4,
                d_model: Positive = 128, heads: Positive = 4, context: Positive | None = None,
                mlp_ratio: Positive = 4, vocab: Positive | None = None) -> nn.Module:
    """Small causal (GPT-style, pre-norm) transformer; predicts from the last position.

    Vaswani et al. 2017 attention with GPT-2's pre-norm blocks and initialisation (Radford et
    al. 2019), as in nanoGPT. `context` (default: the sequence length) sizes the learned
    position embedding; `vocab` defaults to `num_classes`.
    """
    t = _sequence_length("transformer", input_shape)
    context = context or t
    if d_model % heads:
        raise ConfigError("d_model must be a multiple of heads", key="heads", value=heads,
                          allowed=f"a divisor of {d_model}")
    if context < t:
        raise ConfigError(f"context must cover the sequence length {t}", key="context", value=context)
    return CausalTransformer(vocab or num_classes, num_classes, context, d_model, heads, layers,
                             mlp_ratio * d_model)
