"""DP-FedAvg (McMahan et al., ICLR 2018) with adaptive clipping (Andrew et al., NeurIPS 2021): clipping
and one noised round by hand, keyed noise, the clip update by hand and its convergence to the target
quantile, the RDP accountant against `dp-accounting` itself, the metrics line, bytes."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp

from fedsim import rng, testing
from strategies.dp import clip_rows, value_noise
from tests.strategies.linear import LinearProblem


def _run(params, problem, rounds, **kw):
    return testing.run(testing.build("dp-fedavg", params, problem, kw.get("participation")), problem, rounds,
                       **kw)


def _local(problem, x, lr, k):
    """K exact GD steps of every client from x: Delta [N, d] (the honest updates)."""
    y = x.expand(problem.num_clients, -1).clone()
    for _ in range(k):
        y = y - lr * problem.h * (y - problem.c)
    return y - x


def test_clipping_by_hand():
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=torch.float64)   # norms 5, 0.5, 0
    clipped, bits = clip_rows(rows, 1.0)
    torch.testing.assert_close(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]],
                                                     dtype=torch.float64), rtol=0, atol=1e-15)
    assert bits.flatten().tolist() == [0.0, 1.0, 1.0]


def test_one_noised_round_by_hand():
    # Prepare: 4 clients, full participation (m = 4), C = 0.3, z = 0.8
    problem = testing.heterogeneous_quadratic(num_clients=4, dim=3, seed=5)
    x0 = torch.zeros(3, dtype=torch.float64)
    # Execute
    loop = _run({"lr": 0.1, "local_steps": 2, "clip": 0.3, "noise_multiplier": 0.8}, problem, 1, seed=7)
    # Assert: x1 = (sum_i clip(Delta_i) + z C n) / m with n keyed by (seed 7, DP, round 0, stream 0)
    d = _local(problem, x0, 0.1, 2)
    clipped = d * torch.clamp(0.3 / d.norm(dim=1, keepdim=True), max=1.0)
    n = rng.normal_torch(7, rng.DP, 0, 0, torch.arange(3), dtype=torch.float64)
    want = (clipped.sum(0) + 0.8 * 0.3 * n) / 4
    torch.testing.assert_close(loop.state.server["x"], want, rtol=0, atol=1e-15)
    assert (d.norm(dim=1) > 0.3).sum() >= 2   # the clip is active for several clients


def test_noise_is_keyed_reproducible_chunk_invariant_and_added_in_empty_rounds():
    problem = testing.heterogeneous_quadratic(num_clients=6, dim=4, seed=1)
    part = testing.bernoulli([0.5] * 6, seed=2)
    params = {"clip": 0.5, "noise_multiplier": 1.0}
    a = _run(params, problem, 5, participation=part).state.server["x"]
    assert torch.equal(a, _run(params, problem, 5, participation=part).state.server["x"])
    chunked = _run(params, problem, 5, participation=part, chunk_size=1).state.server["x"]
    torch.testing.assert_close(chunked, a, rtol=0, atol=1e-15)
    assert not torch.equal(a, _run(params, problem, 5, participation=part, seed=1).state.server["x"])
    nobody = testing.MaskParticipation([[0] * 6])
    nobody.probabilities = np.full(6, 0.5)               # a round of Poisson(0.5) sampling that drew nobody
    moved = _run(params, problem, 1, participation=nobody).state.server["x"]
    n = rng.normal_torch(0, rng.DP, 0, 0, torch.arange(4), dtype=torch.float64)
    torch.testing.assert_close(moved, 1.0 * 0.5 * n / 3, rtol=0, atol=1e-15)   # z C n / m, m = 3


def test_keyed_normals_are_standard():
    z = rng.normal_torch(3, rng.DP, 0, 0, torch.arange(200_000))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert torch.equal(z[:10], rng.normal_torch(3, rng.DP, 0, 0, torch.arange(10)))


def test_adaptive_clip_update_by_hand():
    """z = 1 with sigma_b = 1: z_D = (1 - 1/4)^(-1/2). Bits b_i = [||Delta_i|| <= C]; the clip
    becomes C exp(-0.2 ((sum (b_i - 1/2) + sigma_b n_b) / m + 1/2 - 0.5))."""
    problem = testing.heterogeneous_quadratic(num_clients=5, dim=3, seed=9)
    params = {"lr": 0.1, "local_steps": 3, "clip": 0.45, "noise_multiplier": 1.0, "adaptive": True,
              "clip_count_stddev": 1.0, "target_quantile": 0.5, "clip_lr": 0.2}
    loop = _run(params, problem, 1, seed=4)
    d = _local(problem, torch.zeros(3, dtype=torch.float64), 0.1, 3)
    bits = (d.norm(dim=1) <= 0.45).double()
    assert 0 < bits.sum() < 5
    nb = float(rng.normal_torch(4, rng.DP, 0, 1, 0))
    b = (float((bits - 0.5).sum()) + nb) / 5 + 0.5
    assert abs(value_noise(1.0, 1.0) - (1 - 0.25) ** -0.5) < 1e-15
    want_clip = torch.tensor([0.45 * math.exp(-0.2 * (b - 0.5))], dtype=torch.float64)
    torch.testing.assert_close(loop.state.server["clip"], want_clip, rtol=0, atol=1e-15)
    clipped = d * torch.clamp(0.45 / d.norm(dim=1, keepdim=True), max=1.0)
    n = rng.normal_torch(4, rng.DP, 0, 0, torch.arange(3), dtype=torch.float64)
    want = (clipped.sum(0) + value_noise(1.0, 1.0) * 0.45 * n) / 5
    torch.testing.assert_close(loop.state.server["x"], want, rtol=0, atol=1e-15)



def test_adaptive_clip_tracks_the_target_quantile_of_the_update_norms():
    # Prepare: 10 clients whose update norms are 0.1, 0.2, ..., 1.0 (lr 0.1, K 1, ||g_i|| = i)
    g = torch.zeros(10, 2, dtype=torch.float64)
    g[:, 0] = torch.arange(1, 11, dtype=torch.float64)
    problem = LinearProblem(g)
    for quantile, lo, hi in ((0.3, 0.3, 0.4), (0.7, 0.7, 0.8)):
        # Execute (no noise: the bits are exact)
        loop = _run({"lr": 0.1, "local_steps": 1, "clip": 0.05, "adaptive": True, "target_quantile": quantile,
                     "clip_lr": 0.2}, problem, 300)
        # Assert: the unclipped fraction equals the target once lo <= C < hi
        c = float(loop.state.server["clip"][0])
        assert lo - 1e-9 <= c < hi + 1e-9, (quantile, c)


@pytest.mark.parametrize("q,z", [(1.0, 1.5), (0.5, 1.2), (0.1, 0.8)])
def test_accountant_matches_dp_accounting_and_lands_in_the_metrics(q, z):
    problem = testing.heterogeneous_quadratic(num_clients=10, dim=2, seed=0)
    part = None if q == 1.0 else testing.bernoulli([q] * 10, seed=1)
    lines = []
    _run({"clip": 1.0, "noise_multiplier": z, "delta": 1e-6}, problem, 6, participation=part,
         eval_every=2, on_eval=lines.append)
    assert [m["round"] for m in lines] == [2, 4, 6]
    for m in lines:
        acc = rdp.RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), m["round"])
        assert m["dp_epsilon"] == pytest.approx(acc.get_epsilon(1e-6), rel=1e-12)
        assert m["dp_delta"] == 1e-6 and m["dp_clip"] == 1.0
    assert lines[0]["dp_epsilon"] < lines[1]["dp_epsilon"] < lines[2]["dp_epsilon"]


def test_no_noise_reports_no_epsilon_and_more_noise_less_epsilon():
    problem = testing.heterogeneous_quadratic(num_clients=4, dim=2, seed=0)
    eps = {}
    for z in (0.0, 0.7, 1.4):
        lines = []
        _run({"noise_multiplier": z}, problem, 3, on_eval=lines.append)
        eps[z] = lines[-1]["dp_epsilon"]
    assert eps[0.0] is None and eps[0.7] > eps[1.4] > 0


def test_bytes_of_adaptive_clipping_one_bit_up_one_value_down():
    problem = testing.heterogeneous_quadratic(num_clients=6, dim=5, seed=1)
    loop = _run({"adaptive": True}, problem, 2)
    assert loop.state.bytes.per_round == [(6 * (40 + 1), 6 * (40 + 8))] * 2
