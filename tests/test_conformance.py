"""One conformance test for every registered strategy (built-ins and future ones).

Each strategy, with its default hyperparameters, must:
* keep shapes, declare its payload, and leave its inputs unmodified, on fresh and on warm state;
* give bitwise-identical reruns and the same result (float64, 1e-10) whatever the chunking;
* converge, on a HETEROGENEOUS quadratic (8 clients, d = 5, exact gradients, full
  participation), to the fixed point its algorithm has in closed form: the optimum x* for the
  drift-corrected and gradient methods, FedAvg's biased fixed point for local-update methods
  (with the local step and weights the strategy implies), the D-SGD / CHOCO fixed point for
  gossip. A strategy whose fixed point has no closed form is checked on a homogeneous
  quadratic (every client the same f) and says why in `HOMOGENEOUS_ONLY`.

Closed forms for f_i(x) = 0.5 sum_j h_ij (x_j - c_ij)^2 and weights w_i (per coordinate):
  x*            = sum_i w_i h_i c_i / sum_i w_i h_i
  FedAvg(lr, K) : a_i = (1 - lr h_i)^K,  x = sum_i w_i (1 - a_i) c_i / sum_i w_i (1 - a_i)
  FedProx(mu)   : the same with b_i = (1 - (1 - lr (h_i + mu))^K) h_i / (h_i + mu) for 1 - a_i
  D-SGD (atc)   : X = W (C + A (X - C))            ->  (I - W A) X = W (I - A) C
  CHOCO         : X = M (C + A (X - C)), M = I + gamma (W - I)  (public copies exact)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from fedsim import testing
from strategies import STRATEGIES
from topologies import build_topology

NAMES = STRATEGIES.names()
N, D = 8, 5


def _kwargs(name: str, problem: Any, partial: bool) -> dict[str, Any]:
    strat = testing.build(name, {}, problem)
    if strat.comm == "mix":
        return {"topology": build_topology("ring", {}, n=problem.num_clients, seed=0)}
    if not partial:
        return {}
    part = testing.bernoulli([0.5] * problem.num_clients, seed=1)
    return {"participation": part}


@pytest.mark.parametrize("name", NAMES)
def test_conformance(name):
    problem = testing.heterogeneous_quadratic(num_clients=N, dim=D, noise=0.05, seed=2)
    kw = _kwargs(name, problem, partial=True)
    testing.check_strategy(lambda: testing.build(name, {}, problem, kw.get("participation")),
                           problem, rounds=12, **kw)


# ---- closed-form fixed points --------------------------------------------------------------

def _optimum(p: testing.QuadraticProblem) -> np.ndarray:
    return p.optimum.numpy()


def _fedavg(lr: float, steps: int) -> Callable[[testing.QuadraticProblem], np.ndarray]:
    def fixed_point(p: testing.QuadraticProblem) -> np.ndarray:
        h, c = p.h.numpy(), p.c.numpy()
        w = (p.sizes / p.sizes.sum())[:, None]
        one_minus_a = 1 - (1 - lr * h) ** steps
        return (w * one_minus_a * c).sum(0) / (w * one_minus_a).sum(0)
    return fixed_point


def _fedprox(lr: float, steps: int, mu: float) -> Callable[[testing.QuadraticProblem], np.ndarray]:
    """FedProx(lr, K, mu): b_i = (1 - (1 - lr (h_i + mu))^K) h_i / (h_i + mu), x = sum w b c / sum w b."""
    def fixed_point(p: testing.QuadraticProblem) -> np.ndarray:
        h, c = p.h.numpy(), p.c.numpy()
        w = (p.sizes / p.sizes.sum())[:, None]
        b = (1 - (1 - lr * (h + mu)) ** steps) * h / (h + mu)
        return (w * b * c).sum(0) / (w * b).sum(0)
    return fixed_point


def _ring_w(n: int) -> np.ndarray:
    return build_topology("ring", {}, n=n, seed=0).mixing(0).dense()


def _gossip(lr: float, steps: int, gamma: float | None = None) -> Callable[..., np.ndarray]:
    """Node models [N, d] at the fixed point of D-SGD (atc), or of CHOCO with `gamma`."""
    def fixed_point(p: testing.QuadraticProblem) -> np.ndarray:
        h, c = p.h.numpy(), p.c.numpy()
        n = h.shape[0]
        w = _ring_w(n)
        mix = w if gamma is None else np.eye(n) + gamma * (w - np.eye(n))
        out = np.empty_like(c)
        for j in range(c.shape[1]):
            a = np.diag((1 - lr * h[:, j]) ** steps)
            out[:, j] = np.linalg.solve(np.eye(n) - mix @ a, mix @ (np.eye(n) - a) @ c[:, j])
        return out
    return fixed_point


FIXED_POINTS: dict[str, tuple[Callable[[testing.QuadraticProblem], np.ndarray], int]] = {
    # name: (closed form with the strategy's defaults, rounds)
    "fedavg": (_fedavg(0.05, 10), 400),
    "fedavgm": (_fedavg(0.05, 10), 400),
    # the FedAU family defaults to the reference code's lr 0.1, 5 local steps
    "fedau": (_fedavg(0.1, 5), 400),             # full participation: every interval is 1
    "fedavg-all": (_fedavg(0.1, 5), 400),
    "known-prob": (_fedavg(0.1, 5), 400),        # p_i = 1
    "fedvarp": (_fedavg(0.1, 5), 400),
    "mifa": (_fedavg(0.1, 5), 400),
    "fedavg-m": (_fedavg(0.05 * 0.5, 10), 400),  # FedAvg-M(lr, beta) stops where FedAvg(lr beta) does
    "fedavg-m-vr": (_fedavg(0.05, 10), 400),     # the reconstruction's fixed point is FedAvg(lr)'s
    "scaffold": (_optimum, 400),
    "scaffold-m": (_optimum, 400),
    "scaffold-m-vr": (_optimum, 400),
    "gd": (_optimum, 600),
    "ef21": (_optimum, 1500),
    "ef21-w": (_optimum, 1500),                  # its theory step, from estimated L_i
    "econtrol": (_optimum, 1500),
    "co2": (_fedavg(0.05, 8), 600),              # outer momentum, staleness: same fixed point
    "slowmo": (_fedavg(0.05, 8), 400),
    "local-sgd": (_fedavg(0.05, 8), 400),
    "fedprox": (_fedprox(0.05, 10, 0.01), 400),
    "fedadam": (_fedavg(0.05, 10), 600),         # server optimisers stop where the mean update is 0
    "fedyogi": (_fedavg(0.05, 10), 600),
    "fedadagrad": (_fedavg(0.05, 10), 400),
    "fednova": (_fedavg(0.05, 10), 400),         # equal steps: a_i = K for all, FedNova = FedAvg
    "feddyn": (_optimum, 800),                   # the dynamic regulariser removes client drift
    "gossip": (_gossip(0.1, 1), 600),
    "choco": (_gossip(0.1, 1, gamma=0.2), 3000),
}
HOMOGENEOUS_ONLY = {
    "compressed-gd": "naive top-k GD stalls at a point that depends on the compressor's history",
    "gossip-var": "the variance correction is nonlinear in the node models",
    "dp-fedavg": "per-client clipping makes its fixed point the root of a nonlinear equation (clipped "
                 "FedAvg); on identical clients every clipped update still points at x*",
}


def test_the_fixture_separates_the_fixed_points():
    """Client drift is real here: FedAvg's fixed point, FedAvg(lr beta)'s and x* differ."""
    problem = testing.heterogeneous_quadratic(num_clients=N, dim=D, seed=4)
    a, b, star = _fedavg(0.05, 10)(problem), _fedavg(0.025, 10)(problem), _optimum(problem)
    assert min(np.abs(a - star).max(), np.abs(b - star).max(), np.abs(a - b).max()) > 1e-3


def test_every_strategy_has_a_convergence_expectation():
    assert set(FIXED_POINTS) | set(HOMOGENEOUS_ONLY) == set(NAMES)
    assert not set(FIXED_POINTS) & set(HOMOGENEOUS_ONLY)


@pytest.mark.parametrize("name", sorted(FIXED_POINTS))
def test_converges_to_its_closed_form_fixed_point(name):
    # Prepare: heterogeneous clients (FedAvg's fixed point is not x*), exact gradients
    problem = testing.heterogeneous_quadratic(num_clients=N, dim=D, seed=4)
    form, rounds = FIXED_POINTS[name]
    want = torch.as_tensor(form(problem))
    # Execute
    loop = testing.run(testing.build(name, {}, problem), problem, rounds,
                       **_kwargs(name, problem, partial=False))
    # Assert
    got = testing.final_models(loop)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-8, msg=f"{name} after {rounds} rounds")


@pytest.mark.parametrize("name", sorted(HOMOGENEOUS_ONLY))
def test_converges_on_a_homogeneous_quadratic(name):
    g = np.random.default_rng(0)
    h, c = g.uniform(0.5, 2.0, 4), g.normal(size=4)
    problem = testing.QuadraticProblem(np.tile(h, (6, 1)), np.tile(c, (6, 1)))
    loop = testing.run(testing.build(name, {}, problem), problem, rounds=300,
                       **_kwargs(name, problem, partial=True))
    x = testing.final_models(loop)
    x = x if x.dim() == 1 else x.mean(0)
    f_star = problem.objective(problem.optimum[None])[0]
    f0 = problem.objective(torch.zeros(1, 4, dtype=torch.float64))[0]
    gap = float(problem.objective(x[None])[0] - f_star)
    assert gap <= 1e-6 * float(f0 - f_star), f"{name}: suboptimality {gap:.3e} after 300 rounds"
