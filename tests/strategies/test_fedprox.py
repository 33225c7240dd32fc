"""FedProx (Li et al., MLSys 2020): mu = 0 is FedAvg bit for bit, one round by hand, the closed-form
fixed point on the drift quadratic, the proximal term vanishing at a single client's optimum."""

from __future__ import annotations

import numpy as np
import torch

from fedsim import testing
from fedsim.work import WORK
from strategies.fedprox import ProximalOracle


def _x(name, params, problem, rounds, **kw) -> torch.Tensor:
    return testing.final_models(testing.run(testing.build(name, params, problem), problem, rounds, **kw))


def test_mu_zero_is_fedavg_bitwise_under_noise_participation_and_uneven_work():
    # Prepare: noisy gradients, random participation, per-client budgets
    problem = testing.heterogeneous_quadratic(num_clients=6, dim=3, noise=0.1, seed=4)
    part = testing.bernoulli([0.5] * 6, seed=3)
    work = WORK.build("uniform", {"low": 0, "high": 7}, num_clients=6, seed=1, sizes=np.ones(6),
                      batch_size=None)
    kw = dict(participation=part, work=work)
    # Execute
    a = _x("fedprox", {"mu": 0.0, "lr": 0.07, "local_steps": 4, "server_lr": 0.8}, problem, 12, **kw)
    b = _x("fedavg", {"lr": 0.07, "local_steps": 4, "server_lr": 0.8}, problem, 12, **kw)
    # Assert
    assert torch.equal(a, b)
    assert not torch.equal(a, _x("fedprox", {"mu": 0.1, "lr": 0.07, "local_steps": 4, "server_lr": 0.8},
                                 problem, 12, **kw))


def test_one_round_by_hand_on_the_drift_quadratic():
    """h = (1, 4), c = (0, 1), x0 = 0, lr 0.1, K = 2, mu = 0.5.

    Client 0 sits at its optimum (gradient 0, prox 0): Delta = 0. Client 1:
    y1 = 0 - 0.1 (4 (0 - 1) + 0.5 * 0) = 0.4; y2 = 0.4 - 0.1 (4 (0.4 - 1) + 0.5 * 0.4) = 0.62,
    so x1 = (0 + 0.62) / 2 = 0.31 (FedAvg: y2 = 0.64, x1 = 0.32)."""
    problem = testing.drift_quadratic()
    got = _x("fedprox", {"lr": 0.1, "local_steps": 2, "mu": 0.5}, problem, 1)
    torch.testing.assert_close(got, torch.tensor([0.31], dtype=torch.float64), rtol=0, atol=1e-15)
    fedavg = _x("fedprox", {"lr": 0.1, "local_steps": 2, "mu": 0.0}, problem, 1)
    torch.testing.assert_close(fedavg, torch.tensor([0.32], dtype=torch.float64), rtol=0, atol=1e-15)


def test_fixed_point_on_the_drift_quadratic_matches_the_closed_form():
    """b_i = (1 - (1 - lr (h_i + mu))^K) h_i / (h_i + mu); x = sum b_i c_i / sum b_i (= b_1 / (b_0 + b_1))."""
    lr, k = 0.1, 10
    for mu in (0.0, 0.3, 2.0):
        h = np.array([1.0, 4.0])
        b = (1 - (1 - lr * (h + mu)) ** k) * h / (h + mu)
        want = b[1] / b.sum()
        got = float(_x("fedprox", {"lr": lr, "local_steps": k, "mu": mu}, testing.drift_quadratic(), 600)[0])
        assert abs(got - want) < 1e-12, (mu, got, want)
    assert abs(b[1] / b.sum() - 0.6041260077) > 1e-3   # mu = 2 stops elsewhere than FedAvg


def test_the_proximal_term_does_not_bias_a_single_client():
    """With one client, x* is a fixed point of any mu: at y = x = c both gradients vanish."""
    problem = testing.QuadraticProblem([[2.0, 0.5]], [[1.5, -0.7]])
    got = _x("fedprox", {"lr": 0.2, "local_steps": 5, "mu": 3.0}, problem, 400)
    torch.testing.assert_close(got, problem.optimum, rtol=0, atol=1e-12)


def test_proximal_oracle_adds_mu_times_the_displacement():
    problem = testing.heterogeneous_quadratic(num_clients=3, dim=4, seed=0)
    ids = torch.arange(3)
    inner = problem.oracle(ids, 0)
    x = torch.zeros(3, 4, dtype=torch.float64)
    y = torch.ones(3, 4, dtype=torch.float64)
    loss, g = ProximalOracle(inner, x, 0.25)(y, 0)
    loss0, g0 = inner(y, 0)
    assert torch.equal(loss, loss0)                              # f_i's loss, not h_i's
    torch.testing.assert_close(g, g0 + 0.25, rtol=0, atol=1e-15)
    torch.testing.assert_close(ProximalOracle(inner, x, 0.25).full(y)[1], inner.full(y)[1] + 0.25)
