"""The one FLOP counter (fedsim.models.flops): hand counts per layer kind, torch's counter where
it counts, and the same figure in the plan's cost model and the system clock."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.models import build_model
from fedsim.models.flops import FlopCounter, step_flops
from fedsim.system import flops_per_sample


def _count(module: nn.Module, *inputs: torch.Tensor) -> float:
    with FlopCounter(module) as fc:
        module(*inputs)
    return fc.total


def test_linear_on_data_costs_twice_its_forward_and_three_times_deeper():
    d, h, c, b = 7, 5, 3, 4
    one = nn.Linear(d, c)
    assert _count(one, torch.randn(b, d)) == 2 * (2 * b * d * c)
    two = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c))
    assert _count(two, torch.randn(b, d)) == 2 * (2 * b * d * h) + 3 * (2 * b * h * c)
    assert _count(one, torch.randn(b, d, requires_grad=True)) == 3 * (2 * b * d * c)


def test_conv_counts_groups_and_transposed_convolutions():
    x = torch.randn(2, 4, 6, 6)
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)  # out [2, 8, 6, 6], 2 input channels per group
    assert _count(conv, x) == 2 * (2 * (2 * 8 * 6 * 6) * 2 * 9)
    up = nn.ConvTranspose2d(4, 6, 2, stride=2)  # every input pixel meets 6 x 2 x 2 weights
    assert _count(up, x) == 2 * (2 * x.numel() * 6 * 4)


@pytest.mark.parametrize("cell, gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_recurrent_layers_count_every_layer_direction_and_gate(cell, gates):
    b, t, f, h = 3, 5, 4, 6
    rnn = cell(f, h, num_layers=2, batch_first=True, bidirectional=True)
    tokens = b * t
    layer0 = 2 * tokens * gates * h * 2  # per input (or hidden) feature, both directions
    fwd_in0, fwd_hh0 = layer0 * f, layer0 * h
    fwd_in1, fwd_hh1 = layer0 * 2 * h, layer0 * h
    expected = 2 * fwd_in0 + 3 * (fwd_hh0 + fwd_in1 + fwd_hh1)  # raw data: no input gradient
    assert _count(rnn, torch.randn(b, t, f)) == expected
    time_major = cell(f, h, num_layers=2, bidirectional=True)
    assert _count(time_major, torch.randn(t, b, f)) == expected


def test_attention_products_are_counted_functional_and_as_a_module():
    n, heads, t, e = 2, 3, 5, 4
    q = torch.randn(n, heads, t, e, requires_grad=True)

    class Sdpa(nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert _count(Sdpa(), q) == 3 * 4 * n * heads * t * t * e  # QK^T and AV, full t x t, x3

    class Mat(nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            d = q.detach()
            return (q @ q.transpose(-1, -2)).sum() + torch.matmul(d, d.transpose(-1, -2)).sum()
    assert _count(Mat(), q) == 3 * 2 * n * heads * t * t * e + 1 * 2 * n * heads * t * t * e

    d, length = 8, 5
    mha = nn.MultiheadAttention(d, 2, batch_first=True)
    x = torch.randn(n, length, d)
    proj = 2 * n * length * d * d * 4  # q, k, v and output projections
    assert _count(mha, x, x, x) == 3 * (proj + 4 * n * length * length * d)


def test_equals_torch_flop_counter_on_linear_and_conv_models():
    """torch's FlopCounterMode is exact on mm / addmm / convolution (it misses LSTM and SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    for kind, params, shape in (("mlp", {"hidden": [32, 16]}, (20,)), ("cnn", {}, (3, 12, 12)),
                                ("femnist-cnn", {}, (1, 28, 28)), ("resnet", {"depth": 8}, (3, 8, 8))):
        model = build_model(kind, params, input_shape=shape, num_classes=10)
        x, y = torch.randn(4, *shape), torch.randint(0, 10, (4,))
        ref = FlopCounterMode(display=False)
        with ref:
            F.cross_entropy(model(x), y).backward()
        assert step_flops(model, x, y) == ref.get_total_flops(), kind


def test_char_lstm_flops_per_sample_by_hand_in_the_system_clock():
    """LEAF's Shakespeare model: embedding 8, 2 x LSTM 256, linear on the last position."""
    t, vocab, b = 10, 30, 4
    model = build_model("char-lstm", {}, input_shape=(t,), num_classes=vocab)
    x, y = torch.randint(0, vocab, (b, t)), torch.randint(0, vocab, (b,))
    lstm = 2 * t * 4 * 256 * ((8 + 256) + (256 + 256))  # per sample, both layers, forward
    head = 2 * 256 * vocab
    assert flops_per_sample(model, x, y) == 3 * lstm + 3 * head  # the embedding output needs grads
