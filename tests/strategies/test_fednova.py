"""FedNova (Wang et al., NeurIPS 2020): equal steps = FedAvg, one round by hand, the normaliser of
local momentum, and FedAvg's objective inconsistency under uneven local work against FedNova's fix,
both in closed form.

Closed forms (exact gradients, f_i = 1/2 h_i (x - c_i)^2 per coordinate, tau_i local steps of lr,
q_i = (1 - lr h_i)^tau_i, weights p_i): one round maps x to x + sum p_i (1 - q_i)(c_i - x) (FedAvg)
or x + tau_eff sum p_i (1 - q_i)(c_i - x) / tau_i (FedNova), so the fixed points are
    FedAvg   sum p_i (1 - q_i) c_i / sum p_i (1 - q_i)
    FedNova  sum p_i (1 - q_i)/tau_i c_i / sum p_i (1 - q_i)/tau_i.
As lr -> 0, 1 - q_i ~ lr tau_i h_i: FedAvg tends to the optimum of the surrogate sum p_i tau_i f_i,
FedNova to x* = sum p_i h_i c_i / sum p_i h_i, the optimum of the true objective.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsim import testing
from fedsim.work import WORK
from strategies.fednova import normalizer
from tests.strategies.linear import LinearProblem

K = [1, 2, 5, 10, 3, 8]   # uneven local work of 6 clients


def _steps(k):
    return WORK.build("steps", {"steps": list(k)}, num_clients=len(k), seed=0, sizes=np.ones(len(k)),
                      batch_size=None)


def _x(name, params, problem, rounds, **kw) -> torch.Tensor:
    return testing.final_models(testing.run(testing.build(name, params, problem), problem, rounds, **kw))


def _fixed_points(problem, lr, tau):
    h, c = problem.h.numpy(), problem.c.numpy()
    p = (problem.sizes / problem.sizes.sum())[:, None]
    tau = np.asarray(tau, dtype=np.float64)[:, None]
    one_minus_q = 1 - (1 - lr * h) ** tau
    avg = (p * one_minus_q * c).sum(0) / (p * one_minus_q).sum(0)
    nova = (p * one_minus_q / tau * c).sum(0) / (p * one_minus_q / tau).sum(0)
    surrogate = (p * tau * h * c).sum(0) / (p * tau * h).sum(0)
    return avg, nova, surrogate


def test_equal_steps_are_fedavg_with_and_without_a_work_section():
    problem = testing.heterogeneous_quadratic(num_clients=6, dim=3, noise=0.1, seed=2)
    part = testing.bernoulli([0.6] * 6, seed=1)
    avg = _x("fedavg", {"local_steps": 4}, problem, 10, participation=part)
    for work in (None, _steps([4] * 6)):
        nova = _x("fednova", {"local_steps": 4}, problem, 10, participation=part, work=work)
        torch.testing.assert_close(nova, avg, rtol=0, atol=1e-14)


def test_one_round_by_hand_with_uneven_steps():
    """Drift quadratic, tau = (1, 3), lr 0.1, x0 = 0. Client 0 sits at its optimum: d_0 = 0, a_0 = 1.
    Client 1: y = 0.4, 0.64, 0.784, a_1 = 3, d_1 = 0.784 / 3. tau_eff = 2, so
    x1 = 2 * (0 + 0.784 / 3) / 2 = 0.784 / 3 (FedAvg: 0.784 / 2)."""
    problem, work = testing.drift_quadratic(), _steps([1, 3])
    nova = _x("fednova", {"lr": 0.1}, problem, 1, work=work)
    avg = _x("fedavg", {"lr": 0.1}, problem, 1, work=work)
    torch.testing.assert_close(nova, torch.tensor([0.784 / 3], dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(avg, torch.tensor([0.784 / 2], dtype=torch.float64), rtol=0, atol=1e-15)


def test_objective_inconsistency_fedavg_biased_fednova_consistent():
    # Prepare: heterogeneous clients with uneven budgets; exact gradients
    problem = testing.heterogeneous_quadratic(num_clients=6, dim=4, seed=7)
    lr = 0.05
    want_avg, want_nova, _ = _fixed_points(problem, lr, K)
    # Execute
    avg = _x("fedavg", {"lr": lr}, problem, 500, work=_steps(K))
    nova = _x("fednova", {"lr": lr}, problem, 500, work=_steps(K))
    # Assert: each converges to its closed form; FedNova's is much closer to x*
    torch.testing.assert_close(avg, torch.as_tensor(want_avg), rtol=0, atol=1e-10)
    torch.testing.assert_close(nova, torch.as_tensor(want_nova), rtol=0, atol=1e-10)
    star = problem.optimum.numpy()
    assert np.abs(want_nova - star).max() < 0.25 * np.abs(want_avg - star).max()


def test_small_step_limits_are_the_surrogate_optimum_and_the_true_optimum():
    problem = testing.heterogeneous_quadratic(num_clients=6, dim=4, seed=7)
    star = problem.optimum.numpy()
    for lr in (1e-3, 1e-4):
        avg, nova, surrogate = _fixed_points(problem, lr, K)
        assert np.abs(avg - surrogate).max() < 30 * lr          # O(lr) from the surrogate's optimum
        assert np.abs(nova - star).max() < 30 * lr              # O(lr) from x*
    assert np.abs(surrogate - star).max() > 0.05                 # and those two really differ



def test_normalised_update_of_local_momentum_is_one_gradient_step():
    """Heavy ball on a constant gradient g for tau steps moves lr ||a||_1 g, so d_i = -lr g for every
    tau_i and rho; ||a||_1 = tau for SGD."""
    want = torch.tensor([0.0, 3.0, 7.0], dtype=torch.float64)
    assert torch.equal(normalizer(torch.tensor([0, 3, 7]), 0.0), want)
    g = [[1.0, -2.0], [0.5, 0.0], [3.0, 1.0]]
    problem, lr = LinearProblem(g), 0.1
    for rho in (0.0, 0.5, 0.9):
        strat = testing.build("fednova", {"lr": lr, "rho": rho}, problem)
        loop = testing.run(strat, problem, 1, work=_steps([1, 4, 9]))
        # the one-round update x1 = tau_eff * mean d_i with d_i = -lr g_i
        tau_eff = float(normalizer(torch.tensor([1, 4, 9]), rho).mean())
        want = -lr * tau_eff * torch.tensor(g, dtype=torch.float64).mean(0)
        torch.testing.assert_close(loop.state.server["x"], want, rtol=0, atol=1e-13)


def test_a_client_without_steps_sends_zero():
    problem = testing.drift_quadratic()
    x0 = torch.tensor([0.3], dtype=torch.float64)
    strat = testing.build("fednova", {}, problem)
    loop = testing.run(strat, problem, 3, x0=x0, work=_steps([0, 0]))
    assert torch.equal(loop.state.server["x"], x0)
