"""FedAdam, FedYogi, FedAdagrad (Reddi et al., ICLR 2021, Algorithm 2): one round by hand, and the
paper's update written out in plain Python floats over rounds with changing participants
(including a round nobody joins)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim import testing


def _x(name, params, problem, rounds, **kw) -> torch.Tensor:
    return testing.final_models(testing.run(testing.build(name, params, problem), problem, rounds, **kw))


# f = 1/2 (x - 1)^2; from x0 = 0, one step of lr 0.5: Delta = 0.5
ONE = testing.QuadraticProblem([1.0], [1.0])
HAND = {
    # m0 = 0.1 * 0.5 = 0.05;  v0 = 0.99 * 0.1^2 + 0.01 * 0.25 = 0.0124
    "fedadam": 0.2 * 0.05 / (math.sqrt(0.0124) + 0.1),
    # v0 = 0.01 - 0.01 * 0.25 * sign(0.01 - 0.25) = 0.0125
    "fedyogi": 0.2 * 0.05 / (math.sqrt(0.0125) + 0.1),
    # beta1 = 0: m0 = 0.5;  v0 = 0.01 + 0.25 = 0.26
    "fedadagrad": 0.2 * 0.5 / (math.sqrt(0.26) + 0.1),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_first_round_by_hand(name):
    params = {"lr": 0.5, "local_steps": 1, "server_lr": 0.2, "tau": 0.1}
    if name != "fedadagrad":
        params.update(beta1=0.9, beta2=0.99)
    got = float(_x(name, params, ONE, 1)[0])
    assert abs(got - HAND[name]) < 1e-15, (got, HAND[name])


def _paper(rule, h, c, masks, lr, k, eta, b1, b2, tau):
    """Algorithm 2 in floats: clients' K exact GD steps, the mean update over S, the server rule."""
    n, d = len(h), len(h[0])
    x, m, v = [0.0] * d, [0.0] * d, [tau * tau] * d
    for mask in masks:
        s = [i for i in range(n) if mask[i]]
        if not s:
            continue
        delta = [0.0] * d
        for i in s:
            for j in range(d):
                y = x[j]
                for _ in range(k):
                    y -= lr * h[i][j] * (y - c[i][j])
                delta[j] += (y - x[j]) / len(s)
        for j in range(d):
            m[j] = b1 * m[j] + (1 - b1) * delta[j]
            d2 = delta[j] ** 2
            if rule == "fedadagrad":
                v[j] = v[j] + d2
            elif rule == "fedyogi":
                v[j] = v[j] - (1 - b2) * d2 * (1.0 if v[j] > d2 else -1.0 if v[j] < d2 else 0.0)
            else:
                v[j] = b2 * v[j] + (1 - b2) * d2
            x[j] += eta * m[j] / (math.sqrt(v[j]) + tau)
    return x


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_matches_the_papers_update_with_changing_participants(name):
    # Prepare: 3 clients, d = 2; rounds with {0, 1}, {1, 2}, nobody, everyone
    g = np.random.default_rng(5)
    h, c = g.uniform(0.5, 2.0, (3, 2)), g.normal(size=(3, 2))
    masks = [[1, 1, 0], [0, 1, 1], [0, 0, 0], [1, 1, 1]]
    b1, b2 = (0.9, 0.99) if name != "fedadagrad" else (0.5, 0.0)
    params = {"lr": 0.1, "local_steps": 3, "server_lr": 0.05, "beta1": b1, "tau": 0.02,
              "weighting": "uniform"}
    if name != "fedadagrad":
        params["beta2"] = b2
    problem = testing.QuadraticProblem(h, c, sizes=[5, 1, 3])   # uniform weighting ignores sizes
    # Execute
    got = _x(name, params, problem, 4, participation=testing.MaskParticipation(masks))
    # Assert
    want = _paper(name, h.tolist(), c.tolist(), masks, 0.1, 3, 0.05, b1, b2, 0.02)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-14)


def test_an_empty_round_leaves_the_moments_alone():
    problem = testing.heterogeneous_quadratic(num_clients=3, dim=2, seed=1)
    masks = [[1, 1, 1], [0, 0, 0]]
    one = testing.run(testing.build("fedadam", {}, problem), problem, 1)
    two = testing.run(testing.build("fedadam", {}, problem), problem, 2,
                      participation=testing.MaskParticipation(masks))
    for k in ("x", "m", "v"):
        assert torch.equal(one.state.server[k], two.state.server[k]), k
