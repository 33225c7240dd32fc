"""One conformance test for every registered strategy (built-ins and future ones).

Each strategy, with its default hyperparameters, must: keep shapes and leave its inputs
unmodified; give bitwise-identical reruns; give the same result (float64, 1e-10) whatever the
chunking of clients; and converge to the optimum of a homogeneous quadratic (every client
the same f, so no client drift can excuse a miss), also under partial participation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim import testing
from strategies import STRATEGIES

NAMES = STRATEGIES.names()


def _kwargs(name: str, problem):
    strat = testing.build(name, {}, problem)
    kw = {}
    if strat.comm == "mix":
        from topologies import build_topology

        kw["topology"] = build_topology("ring", {}, n=problem.num_clients, seed=0)
    else:
        kw["participation"] = testing.bernoulli([0.5] * problem.num_clients, seed=1)
        kw["participation"].probabilities = np.full(problem.num_clients, 0.5)
    return kw


@pytest.mark.parametrize("name", NAMES)
def test_conformance(name):
    problem = testing.heterogeneous_quadratic(num_clients=8, dim=5, noise=0.05, seed=2)
    kw = _kwargs(name, problem)
    testing.check_strategy(lambda: testing.build(name, {}, problem, kw.get("participation")),
                           problem, rounds=12, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_homogeneous_quadratic(name):
    g = np.random.default_rng(0)
    h, c = g.uniform(0.5, 2.0, 4), g.normal(size=4)
    problem = testing.QuadraticProblem(np.tile(h, (6, 1)), np.tile(c, (6, 1)))
    kw = _kwargs(name, problem)
    strat = testing.build(name, {}, problem, kw.get("participation"))
    loop = testing.run(strat, problem, rounds=300, **kw)
    x = testing.final_models(loop)
    x = x if x.dim() == 1 else x.mean(0)
    f_star = problem.objective(problem.optimum[None])[0]
    f0 = problem.objective(torch.zeros(1, 4, dtype=torch.float64))[0]
    gap = float(problem.objective(x[None])[0] - f_star)
    assert gap <= 1e-6 * float(f0 - f_star), f"{name}: suboptimality {gap:.3e} after 300 rounds"
