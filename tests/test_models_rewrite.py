"""The engine's exact rewrites (fedsim.models.rewrite) and CPU heap reuse (fedsim.heap).

`pool_before_relu` must be invisible: logits and gradients equal the user's module bit for bit
(float32, with many tied and non-positive pooling windows), parameter names unchanged, the
user's module untouched; only (ReLU, max-pool) pairs of Sequentials move.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedsim.models import StackedModel, build_model, init_params
from fedsim.models.rewrite import pool_before_relu


class Wrapped(nn.Module):
    """A Sequential inside a custom module, and a ReLU before an average pool (must stay)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(4, 4, 3), nn.ReLU(),
                                      nn.AvgPool2d(2))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _tied_images(b: int, c: int, h: int) -> torch.Tensor:
    """Images that are zero outside a small square: with zero conv biases every pooling window
    there is a tie (all equal), and about half of the others are non-positive."""
    gen = torch.Generator().manual_seed(3)
    x = torch.zeros(b, c, h, h)
    x[:, :, 1:4, 2:5] = torch.randn(b, c, 3, 3, generator=gen)
    return x


def _out_and_grads(module: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor):
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out = functional_call(module, leaves, (x,))
    grads = torch.autograd.grad(F.cross_entropy(out, y), list(leaves.values()))
    return out.detach(), grads


@pytest.mark.parametrize("make,shape", [
    (lambda: build_model("cnn", {"channels": [4, 6], "hidden": 8}, input_shape=(1, 9, 9), num_classes=3),
     (1, 9, 9)),
    (lambda: build_model("femnist-cnn", {}, input_shape=(1, 8, 8), num_classes=3), (1, 8, 8)),
    (Wrapped, (1, 9, 9)),
], ids=["cnn", "femnist-cnn", "nested"])
def test_pool_before_relu_is_bitwise_the_same_function(make, shape):
    module = make()
    for mod in module.modules():
        if isinstance(mod, nn.Conv2d) and mod.bias is not None:
            nn.init.zeros_(mod.bias)
    before = [type(m) for m in module.modules()]
    rewritten = pool_before_relu(module)
    assert rewritten is not module
    assert [type(m) for m in module.modules()] == before, "the user's module must not change"
    names = dict(module.named_parameters())
    assert dict(rewritten.named_parameters()).keys() == names.keys()
    assert all(p is names[k] for k, p in rewritten.named_parameters()), "layers are shared"
    x, y = _tied_images(6, *shape[:2]), torch.arange(6) % 3
    params = {k: v.detach() for k, v in names.items()}
    ref_out, ref_grads = _out_and_grads(module, params, x, y)
    out, grads = _out_and_grads(rewritten, params, x, y)
    assert torch.equal(out, ref_out)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.equal(a, b)
    assert any(bool((g == 0).any()) for g in ref_grads), "the inputs must exercise dead windows"


def test_only_relu_then_max_pool_pairs_move():
    order = [type(m).__name__ for m in pool_before_relu(Wrapped()).features]
    assert order == ["Conv2d", "MaxPool2d", "ReLU", "Conv2d", "ReLU", "AvgPool2d"]
    seq = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    assert pool_before_relu(seq) is seq
    keeps_indices = nn.Sequential(nn.ReLU(), nn.MaxPool1d(2, return_indices=True))
    assert pool_before_relu(keeps_indices) is keeps_indices


def test_every_kind_runs_the_rewritten_module_and_matches_the_plain_module():
    """StackedModel's kinds (on the rewritten module) give the plain module's logits and
    per-client gradients on tied inputs (float32, loop bitwise; the others to rounding)."""
    make = lambda: build_model("cnn", {"channels": [3, 4], "hidden": 6}, input_shape=(1, 8, 8),  # noqa: E731
                               num_classes=3)
    sm = StackedModel(make())
    assert [type(m).__name__ for m in sm._exec][:3] == ["Conv2d", "MaxPool2d", "ReLU"]
    x = init_params(make, sm.spec, seed=1, ids=[0, 1])
    inputs = torch.stack([_tied_images(5, 1, 8), _tied_images(5, 1, 8) * 2])
    labels = torch.arange(10).view(2, 5) % 3
    ref = [_out_and_grads(sm.module, sm.spec.unflatten(x[i]), inputs[i], labels[i]) for i in range(2)]
    for kind in ("loop", "stacked", "vmap"):
        for i in range(2):
            xi = x[i:i + 1].clone().requires_grad_(True)
            out = sm.forward(xi, inputs[i:i + 1], kind)[0]
            (g,) = torch.autograd.grad(F.cross_entropy(out, labels[i]), xi)
            flat_ref = torch.cat([t.reshape(-1) for t in ref[i][1]])
            if kind == "loop":
                assert torch.equal(out.detach(), ref[i][0]) and torch.equal(g[0], flat_ref)
            else:
                torch.testing.assert_close(out.detach(), ref[i][0])
                torch.testing.assert_close(g[0], flat_ref)


HEAP_PROBE = r"""
import json, resource, sys
import torch, torch.nn.functional as F
from torch import nn
from fedsim.heap import reuse_freed_memory
torch.set_num_threads(1)
state = reuse_freed_memory() if sys.argv[1] == "reuse" else "default"
net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                    nn.Linear(4096, 64), nn.ReLU(), nn.Linear(64, 10))
x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
def step():
    F.cross_entropy(net(x), y).backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
print(json.dumps({"state": state, "faults_per_step": faults}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_reused_heap_stops_page_faults_in_training_steps():
    """With glibc's defaults a CNN step maps and faults in megabytes afresh (hundreds to
    thousands of minor faults); after reuse_freed_memory, next to none."""
    got = json.loads(subprocess.run([sys.executable, "-c", HEAP_PROBE, "reuse"], capture_output=True,
                                    text=True, check=True).stdout)
    assert got["state"].startswith("reused (glibc")
    assert got["faults_per_step"] < 100, got
