"""FedDyn (Acar et al., ICLR 2021): one round by hand, the invariant h = (1/N) sum_i g_i under any
participation, and the paper's fixed-point property (the true optimum on heterogeneous clients,
with g_i -> grad f_i(x*) and h -> 0), for uniform and sample weights."""

from __future__ import annotations

import numpy as np
import torch

from fedsim import testing
from fedsim.engines.loop import RoundLoop


def test_one_round_by_hand():
    """Drift quadratic, K = 1, lr 0.1, alpha 0.5, x0 = 0. Client 0 is at its optimum: delta 0.
    Client 1: y = 0 - 0.1 * 4 (0 - 1) = 0.4, g_1 = -0.5 * 0.4 = -0.2. Server: mean delta 0.2,
    h = -0.5 * (2/2) * 0.2 = -0.1, x = 0 + 0.2 + 0.1 / 0.5 = 0.4."""
    problem = testing.drift_quadratic()
    loop = testing.run(testing.build("feddyn", {"lr": 0.1, "local_steps": 1, "alpha": 0.5}, problem),
                       problem, 1)
    torch.testing.assert_close(loop.state.server["x"], torch.tensor([0.4], dtype=torch.float64), rtol=0,
                               atol=1e-15)
    torch.testing.assert_close(loop.state.server["h"], torch.tensor([-0.1], dtype=torch.float64), rtol=0,
                               atol=1e-15)
    g = loop.state.store.gather(torch.arange(2))["g"]
    torch.testing.assert_close(g, torch.tensor([[0.0], [-0.2]], dtype=torch.float64), rtol=0, atol=1e-15)


def test_h_is_the_mean_of_all_client_gradients_under_partial_participation():
    problem = testing.heterogeneous_quadratic(num_clients=7, dim=3, noise=0.1, seed=3)
    strat = testing.build("feddyn", {"alpha": 0.3}, problem)
    loop = RoundLoop(strat, problem, torch.zeros(3, dtype=torch.float64), rounds=8, seed=0,
                     participation=testing.bernoulli([0.4] * 7, seed=2))
    for t in range(8):
        loop.step(t)
        g = loop.state.store.gather(torch.arange(7))["g"]
        torch.testing.assert_close(loop.state.server["h"], g.mean(0), rtol=0, atol=1e-14)


def test_converges_to_the_true_optimum_where_fedavg_does_not():
    # Prepare: heterogeneous quadratics (client drift), exact gradients, full participation
    for weighting, sizes in (("uniform", None), ("samples", [3, 1, 4, 1, 5, 9])):
        problem = testing.QuadraticProblem(*_clients(), sizes=sizes)
        strat = testing.build("feddyn", {"lr": 0.1, "alpha": 0.1, "weighting": weighting}, problem)
        # Execute
        loop = testing.run(strat, problem, 1000)
        avg = testing.final_models(testing.run(testing.build("fedavg", {"lr": 0.1}, problem), problem, 1000))
        # Assert: x*, h -> 0, g_i -> grad f_i(x*) (each client's stationary point aligned with x*)
        star = problem.optimum
        torch.testing.assert_close(loop.state.server["x"], star, rtol=0, atol=1e-10)
        assert float((avg - star).abs().max()) > 1e-2
        g = loop.state.store.gather(torch.arange(6))["g"]
        torch.testing.assert_close(g, problem.h * (star - problem.c), rtol=0, atol=1e-9)
        if weighting == "uniform":
            torch.testing.assert_close(loop.state.server["h"], torch.zeros(3, dtype=torch.float64), rtol=0,
                                       atol=1e-10)


def _clients():
    """Curvatures in [0.3, 4] (strong client drift for FedAvg), optima ~ N(0, 1)."""
    g = np.random.default_rng(11)
    return g.uniform(0.3, 4.0, (6, 3)), g.normal(size=(6, 3))
