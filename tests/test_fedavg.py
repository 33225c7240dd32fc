"""FedAvg identities: it reduces to centralized gradient descent where theory says so."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedsim.config import parse_scenario
from fedsim.engines.loop import RoundLoop
from fedsim.setup import build_setup
from tests.conftest import small_scenario


def _setup(**over):
    sc = parse_scenario(small_scenario(**over))
    return build_setup(sc)


def _central_gd(setup, x, lr, steps):
    """Full-batch GD on the pooled training data of all clients (sample-weighted mean loss)."""
    ds = setup.dataset
    idx = torch.as_tensor(__import__("numpy").concatenate(setup.parts))
    xs = torch.as_tensor(ds.x_train, dtype=torch.float64)[idx]
    ys = torch.as_tensor(ds.y_train)[idx]
    for _ in range(steps):
        xg = x.detach().requires_grad_(True)
        logits = setup.model.forward_shared(xg[None], xs)[0]
        (g,) = torch.autograd.grad(F.cross_entropy(logits, ys), xg)
        x = x - lr * g
    return x


def test_full_participation_one_step_full_batch_equals_central_gd():
    # Prepare: every client, 1 local step of full-batch GD, sample weighting, server_lr 1
    setup = _setup(participation={"kind": "full"}, rounds=4,
                   data={"size_skew": 0.5},  # unequal client sizes: weighting must be by n_i
                   strategy={"name": "fedavg", "lr": 0.3, "local_steps": 1, "batch_size": None})
    loop = RoundLoop.from_setup(setup)
    # Execute
    loop.run()
    # Assert: four FedAvg rounds == four centralized GD steps
    expect = _central_gd(setup, setup.x0.double(), 0.3, 4)
    torch.testing.assert_close(loop.state.server["x"], expect, rtol=0, atol=1e-10)


def test_single_client_k_steps_equals_central_gd():
    setup = _setup(data={"clients": 1}, participation={"kind": "full"}, rounds=2,
                   strategy={"name": "fedavg", "lr": 0.2, "local_steps": 5, "batch_size": None})
    loop = RoundLoop.from_setup(setup)
    loop.run()
    expect = _central_gd(setup, setup.x0.double(), 0.2, 10)
    torch.testing.assert_close(loop.state.server["x"], expect, rtol=0, atol=1e-10)


def test_server_lr_scales_the_averaged_update():
    a = RoundLoop.from_setup(_setup(rounds=1, strategy={"server_lr": 1.0}))
    b = RoundLoop.from_setup(_setup(rounds=1, strategy={"server_lr": 0.5}))
    a.run()
    b.run()
    x0 = a.state.store.x0_of(None)
    torch.testing.assert_close(b.state.server["x"] - x0, 0.5 * (a.state.server["x"] - x0),
                               rtol=0, atol=1e-12)


def test_uniform_weighting_differs_from_sample_weighting_only_with_unequal_sizes():
    kw = dict(rounds=1, participation={"kind": "full"})
    eq_s = RoundLoop.from_setup(_setup(**kw, strategy={"weighting": "samples"}))
    eq_u = RoundLoop.from_setup(_setup(**kw, strategy={"weighting": "uniform"}))
    eq_s.run()
    eq_u.run()
    torch.testing.assert_close(eq_s.state.server["x"], eq_u.state.server["x"], rtol=0, atol=1e-12)
    sk_s = RoundLoop.from_setup(_setup(**kw, data={"size_skew": 1.0}, strategy={"weighting": "samples"}))
    sk_u = RoundLoop.from_setup(_setup(**kw, data={"size_skew": 1.0}, strategy={"weighting": "uniform"}))
    sk_s.run()
    sk_u.run()
    assert (sk_s.state.server["x"] - sk_u.state.server["x"]).abs().max() > 1e-6
