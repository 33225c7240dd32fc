"""Identities of FedAvgM, SCAFFOLD, FedAvg-M, SCAFFOLD-M and the VR variants (float64).

Numbers are those of docs/algorithms.md#client-momentum-tests and #drift-quadratic (drift
quadratic h = [1, 4],
c = [0, 1], lr 0.1, K = 10: FedAvg stops at 0.6041260077, x* = 0.8).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim import testing
from fedsim.comm import weighted_sum
from fedsim.types import RoundCtx

DRIFT = dict(lr=0.1, local_steps=10)
FEDAVG_FP = 0.6041260077
MOMENTUM = ("fedavg-m", "scaffold-m", "fedavg-m-vr", "scaffold-m-vr")
VARIANTS = [(n, {}) for n in MOMENTUM] + [(n, {"correction": "prev_trajectory"})
                                          for n in ("fedavg-m-vr", "scaffold-m-vr")]


def _run(name, params, problem, rounds, **kw):
    return testing.run(testing.build(name, params, problem), problem, rounds, **kw)


def _x(name, params, problem, rounds, **kw) -> torch.Tensor:
    return testing.final_models(_run(name, params, problem, rounds, **kw))


def _noisy(n=6):
    return testing.heterogeneous_quadratic(num_clients=n, dim=3, noise=0.1, seed=4)


def _fedavg_fixed_point(lr, k=10, h=(1.0, 4.0), c=(0.0, 1.0)):
    q = [(1 - lr * hi) ** k for hi in h]
    return sum((1 - qi) * ci for qi, ci in zip(q, c, strict=True)) / sum(1 - qi for qi in q)


class Recorder:
    """Wraps an oracle and records every (step, x, grad) call, in call order."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, x, step):
        loss, g = self.inner(x, step)
        self.calls.append((step, x.clone(), g.clone()))
        return loss, g

    def full(self, x):
        return self.inner.full(x)


def _ctx(n, ids, round):
    mask = torch.zeros(n, dtype=torch.bool)
    mask[ids] = True
    sizes = torch.ones(n, dtype=torch.int64)
    return RoundCtx(round=round, seed=0, ids=ids, num_samples=sizes[ids],
                    weight=torch.full((len(ids),), 1.0 / len(ids), dtype=torch.float64),
                    participants=mask, total_samples=sizes, num_clients=n)


# ---- FedAvgM (server momentum) ---------------------------------------------------------

def test_fedavgm_beta0_is_fedavg_with_server_lr():
    problem, part = _noisy(), testing.bernoulli([0.5] * 6, seed=3)
    a = _x("fedavgm", {"beta": 0.0, "server_lr": 0.7}, problem, 15, participation=part)
    b = _x("fedavg", {"server_lr": 0.7}, problem, 15, participation=part)
    assert torch.equal(a, b)


# ---- FedAvg-M (client momentum) --------------------------------------------------------

def test_fedavg_m_beta1_is_fedavg():
    problem = testing.drift_quadratic()
    x_m = _x("fedavg-m", {**DRIFT, "beta": 1.0}, problem, 500)
    x_a = _x("fedavg", DRIFT, problem, 500)
    assert abs(float(x_m[0]) - FEDAVG_FP) < 1e-9
    torch.testing.assert_close(x_m, x_a, rtol=0, atol=1e-13)


@pytest.mark.parametrize("beta,expect", [(0.5, 0.68988), (0.2, 0.75562), (0.1, 0.77804)])
def test_fedavg_m_fixed_point_is_fedavg_fixed_point_at_lr_times_beta(beta, expect):
    x = float(_x("fedavg-m", {**DRIFT, "beta": beta}, testing.drift_quadratic(), 300)[0])
    assert abs(x - expect) < 5e-6
    assert abs(x - _fedavg_fixed_point(0.1 * beta)) < 1e-12
    assert abs(_fedavg_fixed_point(0.1 * beta) - 0.8) < abs(FEDAVG_FP - 0.8)  # less drift


# ---- SCAFFOLD --------------------------------------------------------------------------

@pytest.mark.parametrize("variate", ["II", "I"])
def test_scaffold_reaches_optimum_where_fedavg_stalls(variate):
    problem = testing.drift_quadratic()
    x_s = float(_x("scaffold", {**DRIFT, "variate": variate}, problem, 300)[0])
    x_a = float(_x("fedavg", DRIFT, problem, 300)[0])
    assert abs(x_s - 0.8) < 1e-12
    assert abs(x_a - FEDAVG_FP) < 1e-9


@pytest.mark.parametrize("name", ["scaffold", "scaffold-m", "scaffold-m-vr"])
@pytest.mark.parametrize("weighting", ["uniform", "samples"])
def test_server_control_is_weighted_mean_of_client_controls(name, weighting):
    # Prepare: unequal sizes, random Bernoulli participation (some rounds nobody, some all)
    problem = testing.heterogeneous_quadratic(num_clients=7, dim=3, noise=0.1, seed=5)
    problem.sizes = torch.tensor([1, 5, 2, 8, 3, 1, 4]).numpy()
    part = testing.bernoulli([0.1, 0.3, 0.5, 0.7, 0.9, 0.4, 0.2], seed=7)
    # Execute
    loop = _run(name, {"weighting": weighting}, problem, 25, participation=part)
    # Assert: c == sum_i a_i c_i with a_i = 1/N ("uniform") or n_i / n ("samples")
    c_i = loop.state.store.gather(torch.arange(7))["c"]
    n = torch.as_tensor(problem.sizes, dtype=torch.float64)
    a = torch.full((7,), 1 / 7, dtype=torch.float64) if weighting == "uniform" else n / n.sum()
    assert c_i.abs().max() > 0.1
    torch.testing.assert_close(loop.state.server["c"], a @ c_i, rtol=0, atol=1e-12)


def test_scaffold_option2_control_is_mean_of_used_gradients():
    # Prepare: three rounds so that c and c_i are non-zero
    problem = _noisy()
    loop = _run("scaffold", {"local_steps": 4}, problem, 3)
    ids = torch.tensor([1, 3, 4])
    oracle = Recorder(problem.oracle(ids, 3))
    # Execute
    _, clients, _ = loop.strategy.local(loop.state.server, loop.state.store.gather(ids), oracle,
                                        _ctx(6, ids, 3))
    # Assert
    used = torch.stack([g for _, _, g in oracle.calls]).mean(0)
    assert len(oracle.calls) == 4
    torch.testing.assert_close(clients["c"], used, rtol=0, atol=1e-12)


def test_scaffold_m_beta1_is_scaffold_option2():
    problem, part = _noisy(), testing.bernoulli([0.6] * 6, seed=2)
    a = _run("scaffold-m", {"beta": 1.0, "server_lr": 0.8}, problem, 20, participation=part)
    b = _run("scaffold", {"server_lr": 0.8}, problem, 20, participation=part)
    for k in ("x", "c"):
        torch.testing.assert_close(a.state.server[k], b.state.server[k], rtol=0, atol=1e-12)


# ---- the server direction of the client-momentum family --------------------------------

@pytest.mark.parametrize("name,extra", VARIANTS)
def test_server_direction_is_mean_of_local_directions(name, extra):
    """g+ = (x - mean_i y_i)/(lr K) equals the mean over participants and steps of the d_k.

    d_k = beta G(y_k) + (1 - beta) g, or, VR, G(y_k) - (1 - beta) G(z_k) + (1 - beta) g,
    with G(y) = g_i(y; xi_k) (+ c - c_i for SCAFFOLD-M) and the same xi_k at z_k: x_prev
    (prev_global) or the client's iterate at step k of its previous participation
    (prev_trajectory, which the client then replaces by this round's iterates).
    """
    # Prepare: two rounds of partial participation so that g, c, c_i, x_prev are all set
    problem, beta, lr, k_steps = _noisy(), 0.3, 0.05, 4
    params = {"beta": beta, "lr": lr, "local_steps": k_steps, "weighting": "uniform", **extra}
    loop = _run(name, params, problem, 2, participation=testing.bernoulli([0.7] * 6, seed=1))
    strat, server = loop.strategy, loop.state.server
    ids = torch.tensor([0, 2, 5])
    clients = loop.state.store.gather(ids)
    ctx, oracle = _ctx(6, ids, 2), Recorder(problem.oracle(ids, 2))
    # Execute
    payload, after, _ = strat.local(server, clients, oracle, ctx)
    new = strat.server_update(server, weighted_sum(payload, strat.weights(server, ctx)), ctx)
    # Assert
    shift = server["c"] - clients["c"] if "c" in clients else 0.0
    vr = name.endswith("-vr")
    calls = [oracle.calls[i:i + 2] for i in range(0, len(oracle.calls), 2)] if vr else \
        [[c] for c in oracle.calls]
    d = []
    traj = extra.get("correction") == "prev_trajectory"
    for group in calls:
        fresh = group[0][2] + shift
        if vr:
            (s0, y, _), (s1, z, g_prev) = group
            assert s0 == s1
            if traj:
                assert torch.equal(z, clients["traj"][:, s0]) and torch.equal(after["traj"][:, s0], y)
                assert not torch.equal(z, y)
            else:
                assert torch.equal(z, server["x_prev"].expand(3, -1))
            d.append(fresh - (1 - beta) * (g_prev + shift) + (1 - beta) * server["g"])
        else:
            d.append(beta * fresh + (1 - beta) * server["g"])
    assert len(d) == k_steps
    g_ref = torch.stack(d).mean(0).mean(0)
    torch.testing.assert_close(new["g"], g_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(new["x"], server["x"] - lr * k_steps * g_ref, rtol=0, atol=1e-12)


# ---- hand-computed two-round cases -----------------------------------------------------

HAND = {  # name: (params, expected server state after 2 rounds, expected c_i)
    "fedavgm": ({"beta": 0.9}, {"x": 0.7952, "v": -0.4752}, None),
    "scaffold": ({}, {"x": 0.5312, "c": -1.056}, [0.384, -2.496]),
    "fedavg-m": ({"beta": 0.5}, {"x": 0.4032, "g": -1.116}, None),
    "fedavg-m-vr": ({"beta": 0.5}, {"x": 0.3236, "g": -0.818, "x_prev": 0.16}, None),
    "scaffold-m": ({"beta": 0.5}, {"x": 0.40995, "g": -1.14975, "c": -1.3995}, [0.243, -3.042]),
    "scaffold-m-vr": ({"beta": 0.5}, {"x": 0.3371, "g": -0.8855, "c": -1.4855,
                                        "x_prev": 0.16}, [0.217, -3.188]),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_two_rounds_by_hand(name):
    """Drift quadratic, lr 0.1, K = 2, full participation, x0 = 0, two rounds (the second uses
    the state of the first). Expected values from this plain-Python reference::

        h, c, lr, K = [1.0, 4.0], [0.0, 1.0], 0.1, 2
        grad = lambda i, y: h[i] * (y - c[i])
        def local(i, x, d):                     # y <- y - lr d(g, k); returns y, mean g
            y, gs = x, []
            for k in range(K):
                gs.append(grad(i, y)); y = y - lr * d(gs[-1], k)
            return y, sum(gs) / K
        def fedavgm(R=2, beta=0.9):
            x = v = 0.0
            for r in range(R):
                ys = [local(i, x, lambda g, k: g)[0] for i in (0, 1)]
                v = beta * v + (x - sum(ys) / 2); x = x - v
            return x, v
        def scaffold(R=2):
            x = cs = 0.0; ci = [0.0, 0.0]
            for r in range(R):
                out = [local(i, x, lambda g, k, i=i: g - ci[i] + cs) for i in (0, 1)]
                new = [ci[i] - cs + (x - out[i][0]) / (K * lr) for i in (0, 1)]
                x = x + sum(o[0] - x for o in out) / 2
                cs = cs + sum(new[i] - ci[i] for i in (0, 1)) / 2; ci = new
            return x, cs, ci
        def momentum(R=2, beta=0.5, corrected=False, vr=False):
            x = xp = g = cs = 0.0; ci = [0.0, 0.0]
            for r in range(R):
                def d(i):
                    s = (cs - ci[i]) if corrected else 0.0
                    if vr:
                        return lambda gy, k: gy + s - (1 - beta) * (grad(i, xp) + s) + (1 - beta) * g
                    return lambda gy, k: beta * (gy + s) + (1 - beta) * g
                out = [local(i, x, d(i)) for i in (0, 1)]
                g_new = (x - sum(o[0] for o in out) / 2) / (lr * K)
                xp, x, g = x, x - lr * K * g_new, g_new
                if corrected:
                    cs = cs + sum(out[i][1] - ci[i] for i in (0, 1)) / 2; ci = [o[1] for o in out]
            return x, g, cs, ci, xp
    """
    # Prepare
    params, expect, c_i = HAND[name]
    problem = testing.drift_quadratic()
    # Execute
    loop = _run(name, {"lr": 0.1, "local_steps": 2, **params}, problem, 2)
    # Assert
    for k, v in expect.items():
        assert abs(float(loop.state.server[k][0]) - v) < 1e-12, (k, float(loop.state.server[k][0]))
    if c_i is not None:
        got = loop.state.store.gather(torch.arange(2))["c"][:, 0]
        torch.testing.assert_close(got, torch.tensor(c_i, dtype=torch.float64), rtol=0, atol=1e-12)


# ---- the VR reconstructions, g0, weighting and keys (issue 16) -------------------------------

@pytest.mark.parametrize("beta", [0.5, 0.2, 0.1])
def test_vr_fixed_points_prev_global_is_fedavgs_prev_trajectory_is_fedavg_ms(beta):
    """Exact gradients, drift quadratic (docs/algorithms.md#vr-variants). With z_k = x^{r-1}, at a
    fixed point d_k = h_i (y_k - x) + beta h_i (x - c_i): beta times FedAvg(lr)'s displacement,
    so the fixed point is FedAvg(lr)'s, 0.6041260077, for every beta. With the client's own
    previous trajectory the correction cancels (1 - beta) of the fresh gradient there: the fixed
    point is FedAvg-M's, FedAvg(lr beta)'s (0.689878 / 0.755621 / 0.778038)."""
    problem = testing.drift_quadratic()
    glob = float(_x("fedavg-m-vr", {**DRIFT, "beta": beta}, problem, 400)[0])
    traj = float(_x("fedavg-m-vr", {**DRIFT, "beta": beta, "correction": "prev_trajectory"},
                    problem, 400)[0])
    momentum = float(_x("fedavg-m", {**DRIFT, "beta": beta}, problem, 400)[0])
    assert abs(glob - FEDAVG_FP) < 1e-9
    assert abs(traj - _fedavg_fixed_point(0.1 * beta)) < 1e-12 and abs(traj - momentum) < 1e-12
    s_traj = float(_x("scaffold-m-vr", {**DRIFT, "beta": beta, "correction": "prev_trajectory"},
                      problem, 400)[0])
    assert abs(s_traj - 0.8) < 1e-9


@pytest.mark.parametrize("beta", [0.9, 0.5, 0.1])
def test_vr_with_one_step_and_g0_grad_is_gradient_descent(beta):
    """K = 1, exact gradients, x^{-1} = x^0, g^0 = grad f(x^0): g^{r+1} = grad f(x^r) -
    (1 - beta) grad f(x^{r-1}) + (1 - beta) g^r = grad f(x^r) by induction, so every beta is GD
    with step gamma = lr. Round 0 only computes g^0: 8 rounds = 7 GD steps of 0.1 from 0
    (research script: 0.693212890625). FedAvg-M is not GD."""
    problem = testing.drift_quadratic()
    params = {"lr": 0.1, "local_steps": 1, "beta": beta, "g0": "grad"}
    x = float(_x("fedavg-m-vr", params, problem, 8)[0])
    gd, h, c = 0.0, (1.0, 4.0), (0.0, 1.0)
    for _ in range(7):
        gd -= 0.1 * sum(hi * (gd - ci) for hi, ci in zip(h, c, strict=True)) / 2
    assert x == pytest.approx(gd, abs=1e-15) and x == pytest.approx(0.693212890625, abs=1e-15)
    assert abs(float(_x("fedavg-m", params, problem, 8)[0]) - gd) > 1e-3


@pytest.mark.parametrize("name", MOMENTUM)
def test_g0_grad_spends_round_0_on_the_mean_gradient(name):
    """Drift quadratic from x0 = 0: grad f_1(0) = 0, grad f_2(0) = -4, so g^0 = -2; x stays 0."""
    loop = _run(name, {**DRIFT, "g0": "grad"}, testing.drift_quadratic(), 1)
    assert float(loop.state.server["x"][0]) == 0.0 and float(loop.state.server["g"][0]) == -2.0


@pytest.mark.parametrize("name,beta", [("fedavg-m", 0.5), ("fedavg-m-vr", 0.5)])
def test_default_weighting_is_the_papers_uniform_mean(name, beta):
    """Unequal sizes (1, 9): the default weights clients uniformly, as the paper's
    g = (1/(N K)) sum_i sum_k g_i^k, so the fixed point is the uniform one."""
    problem = testing.drift_quadratic(sizes=[1, 9])
    x = float(_x(name, {**DRIFT, "beta": beta}, problem, 400)[0])
    lr = 0.1 * beta if name == "fedavg-m" else 0.1
    assert abs(x - _fedavg_fixed_point(lr)) < 1e-9
    weighted = float(_x(name, {**DRIFT, "beta": beta, "weighting": "samples"}, problem, 400)[0])
    assert abs(weighted - x) > 0.05


@pytest.mark.parametrize("name", MOMENTUM)
def test_the_global_step_is_one_key(name):
    """gamma = lr K server_lr: a separate `gamma` (which silently overrode server_lr) is gone."""
    from fedsim.errors import ConfigError
    from strategies import STRATEGIES

    with pytest.raises(ConfigError) as err:
        STRATEGIES.validate(name, {"gamma": 0.5})
    assert err.value.key == "gamma" and "unknown key" in str(err.value)


@pytest.mark.parametrize("name", ["fedavg-m-vr", "scaffold-m-vr"])
def test_the_vr_reconstructions_say_so_in_fedsim_list(name, capsys):
    from fedsim.cli import main

    assert main(["list", "strategies"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(name + " "))
    assert "RECONSTRUCTION" in line and "not retrievable" in line


def _budgets(steps):
    from fedsim.work import WORK
    n = len(steps)
    return WORK.build("steps", {"steps": steps}, num_clients=n, seed=0, sizes=[1] * n, batch_size=None)


class _SkipOnce:
    """A `fedsim.work.LocalWork`: K steps for everyone, none for `client` in `round`."""

    def __init__(self, k, client, round):
        self.k, self.client, self.round = k, client, round

    def steps(self, round, ids):
        return np.where((np.asarray(ids) == self.client) & (round == self.round), 0, self.k)


@pytest.mark.parametrize("name", ["fedavg-m-vr", "scaffold-m-vr"])
def test_prev_trajectory_under_work_budgets(name):
    """`work:` budgets: K_i = K everywhere is the plain run bit for bit; a client that takes no
    step keeps its stored trajectory; budgets beyond K run (later steps reuse the last point)."""
    problem, params = _noisy(), {"correction": "prev_trajectory", "local_steps": 4}
    n = problem.num_clients
    plain = _run(name, params, problem, 3)
    same = _run(name, params, problem, 3, work=_budgets([4] * n))
    torch.testing.assert_close(same.state.server["x"], plain.state.server["x"], rtol=0, atol=0)
    ids = torch.arange(n)
    before = _run(name, params, problem, 2).state.store.gather(ids)["traj"]
    idle = _run(name, params, problem, 2, work=_SkipOnce(4, client=n - 1, round=1))
    kept = idle.state.store.gather(ids)["traj"]
    first = _run(name, params, problem, 1).state.store.gather(ids)["traj"]
    torch.testing.assert_close(kept[:-1], before[:-1], rtol=0, atol=0)
    torch.testing.assert_close(kept[-1], first[-1], rtol=0, atol=0)   # still its round-0 path
    assert not torch.equal(kept[-1], before[-1])
    longer = _run(name, params, problem, 3, work=_budgets([7] * n))
    assert torch.isfinite(longer.state.server["x"]).all()
    assert not torch.equal(longer.state.server["x"], plain.state.server["x"])
    assert first.shape == kept.shape == (n, 4, problem.dim)
