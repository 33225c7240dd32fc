"""Model inputs stay compact on the device: uint8 images, int64 token ids; converted per minibatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.data import Normalize
from fedsim.models import StackedModel, build_model, init_params
from fedsim.oracle import BlockOracle, ClientData, device_inputs, evaluate, to_compute
from fedsim.plan import ExecutionPlan
from fedsim.problem import DataProblem

PARTS = [np.arange(0, 6), np.arange(6, 10), np.arange(10, 16)]


def test_storage_dtypes():
    rs = np.random.RandomState(0)
    tokens = rs.randint(0, 50, (16, 5))
    pixels = rs.randint(0, 256, (16, 1, 4, 4)).astype(np.uint8)
    y = rs.randint(0, 3, 16)
    assert ClientData.from_parts(tokens, y, PARTS, "cpu", torch.float32).x.dtype == torch.int64
    data = ClientData.from_parts(tokens.astype(np.int32), y, PARTS, "cpu", torch.float32)
    assert data.x.dtype == torch.int64
    img = ClientData.from_parts(pixels, y, PARTS, "cpu", torch.float32)
    assert img.x.dtype == torch.uint8 and img.x.element_size() == 1
    data = ClientData.from_parts(pixels.astype(np.float64), y, PARTS, "cpu", torch.float32)
    assert data.x.dtype == torch.float32
    assert device_inputs(tokens, "cpu", torch.float64).dtype == torch.int64
    rows = torch.tensor([[0, 5], [7, 9]])
    got = img.inputs(rows)
    assert got.dtype == torch.float32 and got.shape == (2, 2, 1, 4, 4)
    torch.testing.assert_close(got, torch.as_tensor(pixels)[rows].float() / 255, rtol=0, atol=1e-7)
    assert torch.equal(ClientData.from_parts(tokens, y, PARTS, "cpu", torch.float32).inputs(rows),
                       torch.as_tensor(tokens)[rows])


def test_uint8_images_train_and_evaluate_like_their_float_values():
    """Oracle gradients, test metrics and per-client test metrics on uint8 storage equal those on
    the normalised floats (the datasets' Normalize, per channel: its channel axis is 1 of the
    gathered [rows, C, H, W], whatever the [m, B] layout of the minibatch)."""
    rs = np.random.RandomState(1)
    pixels = rs.randint(0, 256, (16, 2, 4, 4)).astype(np.uint8)
    y = rs.randint(0, 3, 16)
    make = lambda: build_model("cnn", {"channels": [3], "hidden": 5}, input_shape=(2, 4, 4),  # noqa: E731
                               num_classes=3).double()
    model = StackedModel(make())
    x = init_params(make, model.spec, 0, ids=[0, 1, 2])
    norm = Normalize(mean=(0.5, 0.25), std=(0.2, 0.4))
    floats = norm.apply_torch(torch.as_tensor(pixels), torch.float64).numpy()  # [16, C, H, W]
    assert floats[3, 1, 2, 0] == pytest.approx((pixels[3, 1, 2, 0] / 255 - 0.25) / 0.4, rel=1e-6)  # channel 1
    a = ClientData.from_parts(pixels, y, PARTS, "cpu", torch.float64, normalize=norm)
    b = ClientData.from_parts(floats, y, PARTS, "cpu", torch.float64)
    ids = torch.arange(3)
    for kind in ("stacked", "loop"):
        plan = ExecutionPlan(kind, 3 if kind == "stacked" else 1, "t", "cpu")
        ga = BlockOracle(model, a, ids, 0, 0, 4, plan)(x, 0)
        gb = BlockOracle(model, b, ids, 0, 0, 4, plan)(x, 0)
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-12)
    ea = evaluate(model, x, torch.as_tensor(pixels), torch.as_tensor(y), 5, normalize=norm)
    eb = evaluate(model, x, torch.as_tensor(floats), torch.as_tensor(y), 5)
    torch.testing.assert_close(ea, eb, rtol=0, atol=1e-12)
    test_parts = [np.arange(0, 5), np.arange(5, 16), np.arange(0, 0)]
    scored = []
    for stored, n in ((pixels, norm), (floats, None)):
        prob = DataProblem(model, a, torch.as_tensor(stored), torch.as_tensor(y), np.array([6, 4, 6]), 0, 4,
                           eval_batch=4, plan=ExecutionPlan("stacked", 2, "t", "cpu"))
        prob.client_test = ClientData.from_parts(stored, y, test_parts, "cpu", torch.float64, normalize=n)
        scored.append(prob.evaluate_clients(x, ids))
    for u, f in zip(*scored, strict=True):
        torch.testing.assert_close(u, f, rtol=0, atol=1e-12)
    assert scored[0][2].tolist() == [5, 11, 0]
    default = to_compute(torch.tensor([0, 51, 255], dtype=torch.uint8), torch.float64)
    assert default.tolist() == [0.0, 0.2, 1.0]


def test_evaluation_blocks_of_models_agree():
    rs = np.random.RandomState(2)
    xs, ys = torch.as_tensor(rs.randn(9, 6)), torch.as_tensor(rs.randint(0, 3, 9))
    make = lambda: build_model("mlp", {"hidden": [4]}, input_shape=(6,), num_classes=3).double()  # noqa: E731
    model = StackedModel(make())
    x = init_params(make, model.spec, 0, ids=list(range(5)))
    ref = evaluate(model, x, xs, ys, 4)
    for kind, block in (("loop", 1), ("stacked", 2), ("vmap", 5)):
        got = evaluate(model, x, xs, ys, 4, plan=ExecutionPlan(kind, block, "t", "cpu"))
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
