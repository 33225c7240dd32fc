"""FedAU (Wang & Ji, ICLR 2024, arXiv:2306.03401) and its baselines: identities, weight traces,
the estimator's mean, O(1) memory, and removal of the participation bias (docs/algorithms.md#fedau-tests).

Reference values come from a replica of IBM/fedau `main.py` (printed in the tests' docstrings;
docs/algorithms.md#fedau-tests).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim import testing
from fedsim.errors import ConfigError
from fedsim.participation import build_participation
from fedsim.types import RoundCtx

INF = None  # cutoff=None is K = inf


def _weight_trace(pattern: list[int], cutoff: int | None) -> list[float]:
    """omega of client 0 at its participations, read through the public `weights` hook.

    Client 0 follows `pattern`; client 1 takes part every round. weights() returns omega / N.
    """
    problem = testing.QuadraticProblem([1.0, 1.0], [0.0, 1.0])
    strat = testing.build("fedau", {"cutoff": cutoff}, problem)
    seen: list[float] = []

    def recording(server, ctx):
        w = strat.weights(server, ctx)
        seen.extend(float(v) * ctx.num_clients for v, i in zip(w, ctx.ids, strict=True) if int(i) == 0)
        return w

    masks = np.array([[bool(b), True] for b in pattern])
    testing.run(strat._replace(weights=recording), problem, len(pattern),
                participation=testing.MaskParticipation(masks))
    return seen


@pytest.mark.parametrize("pattern, cutoff, expected", [
    ([1, 0, 0] * 5, INF, [1.0, 1.0, 2.0, 7 / 3, 2.5]),
    ([1, 0, 0] * 5, 2, [1.0, 1.5, 1.5, 1.5, 1.5]),
    ([0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 1], INF, [1.0, 3.0, 2.5, 2.0]),
    ([0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 1], 3, [1.0, 3.0, 2.5, 2.25]),
])
def test_weight_traces_match_reference(pattern, cutoff, expected):
    """docs/algorithms.md#fedau-tests: the interval ending now is excluded; the cutoff also
    records K while the client is absent.

    Generating code (replica of the reference logic)::

        intervals, cnt, out = [], 0, []
        for part in pattern:
            if part:
                out.append(np.mean(intervals) if intervals else 1.0)
                intervals.append(cnt + 1); cnt = 0
            else:
                cnt += 1
                if cnt >= K: intervals.append(cnt); cnt = 0
    """
    # Prepare / Execute
    trace = _weight_trace(pattern, cutoff)
    # Assert
    np.testing.assert_allclose(trace, expected, rtol=0, atol=1e-12)


def test_full_participation_equals_fedavg_bitwise():
    # Prepare: noisy heterogeneous quadratics, equal sizes, float64, everyone every round
    problem = testing.heterogeneous_quadratic(num_clients=6, dim=4, noise=0.1, seed=3)
    kw = {"lr": 0.1, "local_steps": 3}
    # Execute
    ref = testing.run(testing.build("fedavg", {**kw, "weighting": "uniform"}, problem), problem, 20)
    out = {n: testing.run(testing.build(n, kw, problem), problem, 20)
           for n in ("fedau", "fedavg-all")}
    mifa = testing.run(testing.build("mifa", kw, problem), problem, 20)
    # Assert: every interval is 1, so omega = 1 and FedAU is FedAvg (bitwise); MIFA too (its
    # table mean is maintained incrementally, so up to rounding)
    for name, loop in out.items():
        assert torch.equal(loop.state.server["x"], ref.state.server["x"]), name
    torch.testing.assert_close(mifa.state.server["x"], ref.state.server["x"], rtol=0, atol=1e-12)


def test_full_participation_is_uniform_fedavg_not_sample_weighted():
    """With unequal sizes FedAU under full participation is `fedavg` with weighting: uniform
    (same lr, local_steps, server_lr), and not the default sample-weighted `fedavg`."""
    problem = testing.heterogeneous_quadratic(num_clients=4, dim=3, seed=2, sizes=[1, 2, 3, 14])
    kw = {"lr": 0.1, "local_steps": 5, "server_lr": 1.0}
    au = testing.run(testing.build("fedau", kw, problem), problem, 15).state.server["x"]
    uni = testing.run(testing.build("fedavg", {**kw, "weighting": "uniform"}, problem), problem, 15)
    smp = testing.run(testing.build("fedavg", kw, problem), problem, 15)
    assert torch.equal(au, uni.state.server["x"])
    assert float((au - smp.state.server["x"]).abs().max()) > 1e-2


@pytest.mark.parametrize("name", ["fedau", "fedavg-all", "known-prob", "fedvarp", "mifa"])
def test_the_family_defaults_are_the_reference_codes(name):
    """IBM/fedau config.py: -lr 0.1, -iters-per-round 5, -lr-global 1 (for every -weighting)."""
    from strategies import STRATEGIES

    params = STRATEGIES.params(name)
    assert (params["lr"].default, params["local_steps"].default, params["server_lr"].default) == (0.1, 5, 1.0)


@pytest.mark.parametrize("cutoff, expected", [(INF, 10.0), (5, (1 - 0.9**5) / 0.1)])
def test_estimator_mean_tends_to_truncated_geometric_mean(cutoff, expected):
    """Under Bernoulli(p) omega -> E[min(G, K)] = (1 - (1-p)^K) / p (4.0951 for p=0.1, K=5).

    Counter logic only (server_update with nothing reduced, no training): 400 clients with
    p = 0.1 for 2500 rounds record ~1e5 intervals; the standard error of the mean is ~0.3 %.
    """
    # Prepare
    n, rounds = 400, 2500
    problem = testing.QuadraticProblem(np.ones(n), np.zeros(n))
    strat = testing.build("fedau", {"cutoff": cutoff}, problem)
    part = build_participation("bernoulli", {"p": 0.1}, num_clients=n, seed=5, label_dist=None)
    ids, ones = torch.arange(n), torch.ones(n, dtype=torch.int64)
    server = strat.init_server(torch.zeros(1, dtype=torch.float64))
    # Execute
    for t in range(rounds):
        mask = torch.as_tensor(part.mask(t))
        ctx = RoundCtx(round=t, seed=0, ids=ids[mask], num_samples=ones[mask],
                       weight=torch.full((int(mask.sum()),), 1.0), participants=mask,
                       total_samples=ones, num_clients=n)
        server = strat.server_update(server, {}, ctx)
    ctx_all = RoundCtx(round=rounds, seed=0, ids=ids, num_samples=ones,
                       weight=torch.ones(n, dtype=torch.float64), participants=mask,
                       total_samples=ones, num_clients=n)
    omega = strat.weights(server, ctx_all) * n
    # Assert
    assert abs(float(omega.mean()) / expected - 1) < 0.015
    assert float(server["x"][0]) == 0.0


def test_fedau_state_is_o1_per_client():
    # Prepare
    problem = testing.heterogeneous_quadratic(num_clients=8, dim=50, seed=1)
    part = testing.bernoulli([0.5] * 8, seed=2)
    # Execute
    fedau = testing.run(testing.build("fedau", {}, problem), problem, 10, participation=part)
    mifa = testing.run(testing.build("mifa", {}, problem), problem, 10, participation=part)
    # Assert: no per-client state in the store; the server holds the model plus three int64
    # counters per client (O(1) per client, independent of P)
    assert fedau.state.store.nbytes() == 0
    server_bytes = sum(v.numel() * v.element_size() for v in fedau.state.server.values())
    assert server_bytes == 50 * 8 + 3 * 8 * 8
    assert mifa.state.store.nbytes() == 8 * 50 * 8  # MIFA: one float64 update per client seen


# ---- participation bias (docs/algorithms.md#participation-bias-quadratic) ------------------------------

PATTERNS = {  # p = [0.9, 0.1]; Markov q = 0.2 and cyclic L = 10 mix faster than the reference's
    "bernoulli": {},          # q = 0.05 and L = 100, so that a short run averages out (the
    "markov": {"q": 0.2},     # long-run rates are still exactly p)
    "cyclic": {"period": 10},
}
REPLICAS = 16


def _replicated_bias_problem(copies: int) -> testing.QuadraticProblem:
    """`copies` independent copies of the two-client quadratic (c = [0, 1], h = 1), copy j on
    coordinate j only: clients 2j, 2j+1 have h = 0 elsewhere, so their updates touch nothing
    else."""
    h, c = np.zeros((2 * copies, copies)), np.zeros((2 * copies, copies))
    for j in range(copies):
        h[2 * j, j] = h[2 * j + 1, j] = 1.0
        c[2 * j + 1, j] = 1.0
    return testing.QuadraticProblem(h, c)


def _time_average(name: str, params: dict, pattern: str, copies: int = REPLICAS,
                  rounds: int = 1200, burn_in: int = 300, seed: int = 0) -> float:
    """Mean of the global model over rounds burn_in..rounds and over the copies.

    FedAU, known-prob and fedavg-all divide by N = 2 * copies; server_lr = copies makes each
    coordinate follow exactly the two-client dynamics with eta = 1 (lr 0.005, 5 local steps),
    so `copies` independent runs cost one. FedAvg divides by |S| and runs with copies = 1.
    """
    problem = _replicated_bias_problem(copies)
    part = build_participation(pattern, {"p": [0.9, 0.1] * copies, **PATTERNS[pattern]},
                               num_clients=2 * copies, seed=seed, label_dist=None)
    strat = testing.build(name, {"lr": 0.005, "local_steps": 5, **params}, problem, part)
    xs: list[np.ndarray] = []

    def recording(server, reduced, ctx):
        out = strat.server_update(server, reduced, ctx)
        xs.append(out["x"].numpy().copy())
        return out

    testing.run(strat._replace(server_update=recording), problem, rounds, participation=part)
    return float(np.mean(xs[burn_in:]))


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_fedau_removes_participation_bias(pattern):
    """f_n = 0.5 (x - c_n)^2, c = [0, 1], p = [0.9, 0.1]: x* = 0.5, FedAvg is pulled to ~0.06."""
    # Execute
    fedau = _time_average("fedau", {"server_lr": REPLICAS}, pattern)
    oracle = _time_average("known-prob", {"server_lr": REPLICAS}, pattern)
    fedavg = _time_average("fedavg", {}, pattern, copies=1, rounds=800)
    # Assert
    assert abs(fedau - 0.5) < 0.03, fedau
    assert abs(oracle - 0.5) < 0.03, oracle
    assert abs(fedavg - 0.06) < 0.03, fedavg


def test_fedau_cutoff_and_fedavg_all_biased_points():
    """Bernoulli. K = 5: omega_2 -> 4.0951, omega_1 -> 1, so x -> 0.4095 / 1.4095 = 0.2905.
    fedavg-all (weights 1/N): x -> 0.1 / (0.9 + 0.1) weighted by the rates, ~0.10."""
    fedau_k5 = _time_average("fedau", {"cutoff": 5, "server_lr": REPLICAS}, "bernoulli")
    fedavg_all = _time_average("fedavg-all", {"server_lr": REPLICAS}, "bernoulli")
    assert abs(fedau_k5 - 0.2905) < 0.03, fedau_k5
    assert abs(fedavg_all - 0.10) < 0.03, fedavg_all


# ---- baselines ------------------------------------------------------------------------------

def test_fedvarp_and_mifa_hand_computed_rounds():
    """N = 3, f_i = 0.5 (x - c_i)^2, c = [2, 4, 6], one full-batch step of lr 0.5 (Delta_i =
    (c_i - x) / 2), x0 = 0; round 0 everyone, round 1 clients {0, 2}, round 2 nobody.

    Generating code::

        c = np.array([2., 4., 6.]); y = np.zeros(3); x = 0.   # FedVarp (MIFA analogous)
        for S in ([0, 1, 2], [0, 2], []):
            d = (c[S] - x) / 2
            if S: x += np.mean(d - y[S]) + y.mean(); y[S] = d
        # FedVarp x: 2, 3, 3.  MIFA (y[S] = d; x += y.mean()): 2, 10/3, 14/3
    """
    # Prepare
    problem = testing.QuadraticProblem([1.0, 1.0, 1.0], [2.0, 4.0, 6.0])
    masks = testing.MaskParticipation([[1, 1, 1], [1, 0, 1], [0, 0, 0]])
    kw = {"lr": 0.5, "local_steps": 1}
    # Execute
    got = {}
    for name in ("fedvarp", "mifa"):
        strat, xs = testing.build(name, kw, problem), []

        def recording(server, reduced, ctx, strat=strat, xs=xs):
            out = strat.server_update(server, reduced, ctx)
            xs.append(float(out["x"][0]))
            return out
        testing.run(strat._replace(server_update=recording), problem, 3, participation=masks)
        got[name] = xs
    # Assert
    np.testing.assert_allclose(got["fedvarp"], [2.0, 3.0, 3.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["mifa"], [2.0, 10 / 3, 14 / 3], rtol=0, atol=1e-12)


def test_known_prob_and_fedavg_all_weights():
    # Prepare: p = [0.5, 0.25, 1.0]; clients 0 and 1 take part
    problem = testing.QuadraticProblem([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    part = testing.MaskParticipation([[1, 1, 0]])
    part.probabilities = np.array([0.5, 0.25, 1.0])
    ids, ones = torch.tensor([0, 1]), torch.ones(3, dtype=torch.int64)
    ctx = RoundCtx(round=0, seed=0, ids=ids, num_samples=ones[:2], weight=torch.full((2,), 0.5),
                   participants=torch.tensor([True, True, False]), total_samples=ones,
                   num_clients=3)
    # Execute
    w_known = testing.build("known-prob", {}, problem, part).weights({}, ctx)
    w_all = testing.build("fedavg-all", {}, problem).weights({}, ctx)
    # Assert: 1 / (N p_i) and 1 / N
    torch.testing.assert_close(w_known, torch.tensor([2 / 3, 4 / 3]), rtol=0, atol=1e-15)
    torch.testing.assert_close(w_all, torch.tensor([1 / 3, 1 / 3]), rtol=0, atol=1e-15)


def test_known_prob_without_probabilities_is_a_config_error():
    problem = testing.QuadraticProblem([1.0, 1.0], [0.0, 1.0])
    with pytest.raises(ConfigError, match="known-prob needs participation probabilities"):
        testing.build("known-prob", {}, problem, testing.MaskParticipation([[1, 0]]))
