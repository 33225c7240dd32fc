"""Robust aggregation (fedsim/robust.py) and Byzantine clients (fedsim/attacks.py): the rules by hand,
the gather path equal to the weighted sum, the keyed Byzantine set, FedAvg broken and median /
trimmed mean / Krum holding on the same seeds, and the same results on the Flower engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim import testing
from fedsim.attacks import ATTACKS, byzantine_set, with_attack
from fedsim.config import parse_scenario
from fedsim.engines.loop import RoundLoop
from fedsim.robust import AGGREGATORS, coordinate_median, krum_scores, trimmed, with_aggregator
from fedsim.setup import build_setup
from tests.conftest import small_scenario

ROWS = torch.tensor([[0.0, 10.0], [1.0, -1.0], [2.0, 0.0], [3.0, 2.0], [100.0, 1.0]], dtype=torch.float64)


def test_median_trimmed_mean_and_krum_by_hand():
    torch.testing.assert_close(coordinate_median(ROWS), torch.tensor([2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(coordinate_median(ROWS[:4]), torch.tensor([1.5, 1.0], dtype=torch.float64))
    # beta 0.2 of 5 rows drops one at each end per coordinate: (1 + 2 + 3) / 3, (0 + 1 + 2) / 3
    torch.testing.assert_close(trimmed(ROWS, 0.2), torch.tensor([2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(trimmed(ROWS, 0.0), ROWS.mean(0))
    # f = 1: each row's 5 - 1 - 2 = 2 nearest squared distances. Row 2 = (2, 0): to (1, -1) 2, to (3, 2) 5
    assert abs(float(krum_scores(ROWS, 1)[2]) - 7.0) < 1e-12
    assert int(torch.argmin(krum_scores(ROWS, 1))) == 2


def _agg(name, **params):
    return AGGREGATORS.build(name, params)


def test_krum_picks_a_row_and_multi_krum_averages_the_best():
    ctx_problem = testing.QuadraticProblem(np.ones((5, 2)), np.zeros((5, 2)))
    ctx = _ctx(ctx_problem)
    out = _agg("krum", f=1).combine({"delta": ROWS}, {"delta": torch.full((5,), 0.2)}, ctx)
    torch.testing.assert_close(out["delta"], ROWS[2])
    scores = krum_scores(ROWS, 1)
    best3 = torch.sort(scores, stable=True).indices[:3]
    out = _agg("multi-krum", f=1, select=3).combine({"delta": ROWS}, {"delta": torch.full((5,), 0.2)}, ctx)
    torch.testing.assert_close(out["delta"], ROWS[best3].mean(0))


def _ctx(problem):
    from fedsim import round as kernel

    n = problem.num_clients
    return kernel.make_ctx(0, 0, torch.arange(n), torch.ones(n, dtype=torch.bool),
                           torch.as_tensor(problem.sizes), torch.float64)


@pytest.mark.parametrize("name", ["fedavg", "scaffold", "fednova", "dp-fedavg"])
def test_the_gather_path_with_the_mean_equals_the_weighted_sum(name):
    """Multi-key payloads, weights that do not sum to one (SCAFFOLD's dc: 1/N), DP's noise and
    adaptive bits, partial participation, chunks."""
    problem = testing.heterogeneous_quadratic(num_clients=7, dim=3, noise=0.1, seed=1)
    part = testing.bernoulli([0.5] * 7, seed=4)
    dp = {"noise_multiplier": 0.5, "adaptive": True, "clip_count_stddev": 1.0}
    params = dp if name == "dp-fedavg" else {}
    plain = testing.run(testing.build(name, params, problem, part), problem, 6, participation=part)
    for chunk in (None, 2):
        robust = with_aggregator(testing.build(name, params, problem, part), _agg("mean"))
        got = testing.run(robust, problem, 6, participation=part, chunk_size=chunk)
        for k, v in plain.state.server.items():
            torch.testing.assert_close(got.state.server[k], v, rtol=0, atol=1e-14)


def test_byzantine_set_is_keyed_exact_and_fixed():
    a = byzantine_set(0.2, 10, seed=3)
    assert a.sum() == 2 and np.array_equal(a, byzantine_set(0.2, 10, seed=3))
    assert not np.array_equal(a, byzantine_set(0.2, 10, seed=4)) or not np.array_equal(
        byzantine_set(0.2, 10, seed=5), a)
    assert byzantine_set(0.0, 10, seed=3).sum() == 0 and byzantine_set(0.34, 3, seed=0).sum() == 1


def test_attack_corrupts_only_the_byzantine_clients_model_rows():
    problem = testing.heterogeneous_quadratic(num_clients=6, dim=3, seed=2)
    honest = testing.build("fednova", {}, problem)
    attack = ATTACKS.build("sign_flip", {"fraction": 0.5, "scale": 3.0}, num_clients=6, seed=1)
    ctx = _ctx(problem)
    server, ids = honest.init_server(torch.zeros(3, dtype=torch.float64)), torch.arange(6)
    want, _, _ = honest.local(server, {}, problem.oracle(ids, 0), ctx)
    got, _, _ = with_attack(honest, attack).local(server, {}, problem.oracle(ids, 0), ctx)
    bad = torch.as_tensor(attack.byzantine)
    torch.testing.assert_close(got["delta"][bad], -3.0 * want["delta"][bad], rtol=0, atol=0)
    assert torch.equal(got["delta"][~bad], want["delta"][~bad])
    assert torch.equal(got["a"], want["a"])                    # scalars are not model rows


def test_random_attack_is_keyed_by_round_and_client_not_by_block():
    problem = testing.heterogeneous_quadratic(num_clients=6, dim=3, seed=2)
    attack = ATTACKS.build("random", {"fraction": 0.5, "std": 2.0}, num_clients=6, seed=1)
    runs = [testing.run(with_attack(testing.build("fedavg", {}, problem), attack), problem, 3, chunk_size=c)
            for c in (None, 1, 4)]
    for r in runs[1:]:
        torch.testing.assert_close(r.state.server["x"], runs[0].state.server["x"], rtol=0, atol=1e-15)


def _byzantine_quadratic():
    """10 similar clients (x* near (1, -2, 0.5)); 2 of them Byzantine under every attack below."""
    g = np.random.default_rng(0)
    h = g.uniform(0.8, 1.2, (10, 3))
    c = np.array([1.0, -2.0, 0.5]) + 0.1 * g.normal(size=(10, 3))
    return testing.QuadraticProblem(h, c)


ROBUST = {"median": {}, "trimmed-mean": {"beta": 0.2}, "krum": {"f": 2}, "multi-krum": {"f": 2}}


@pytest.mark.parametrize("attack", [{"kind": "sign_flip", "scale": 5.0}, {"kind": "scale", "scale": 50.0},
                                    {"kind": "random", "std": 30.0}], ids=["sign_flip", "scale", "random"])
def test_fedavg_breaks_and_robust_aggregators_hold_on_the_same_seeds(attack):
    # Prepare: 20% Byzantine clients (the same two under every aggregator)
    problem = _byzantine_quadratic()
    kind, params = attack["kind"], {k: v for k, v in attack.items() if k != "kind"}
    byz = ATTACKS.build(kind, {"fraction": 0.2, **params}, num_clients=10, seed=0)
    star = problem.optimum

    def error(agg):
        strat = with_attack(testing.build("fedavg", {"lr": 0.1, "local_steps": 5}, problem), byz)
        strat = strat if agg is None else with_aggregator(strat, _agg(agg, **ROBUST[agg]))
        return float((testing.run(strat, problem, 60).state.server["x"] - star).norm())
    # Execute / Assert
    clean = float((testing.run(testing.build("fedavg", {"lr": 0.1, "local_steps": 5}, problem), problem, 60)
                   .state.server["x"] - star).norm())
    broken = error(None)
    assert broken > 1.0 and clean < 0.01, (broken, clean)   # clean: FedAvg's own small drift bias
    for agg in ROBUST:
        assert error(agg) < 0.1, (agg, error(agg))


def test_scenario_level_attack_and_aggregator_on_real_data():
    """25% sign-flipping clients on the (non-IID) synthetic task: FedAvg's loss explodes, while the
    median and Multi-Krum end where they end without the attack (the attack costs them nothing;
    their price is paid on non-IID data with or without it)."""
    def final(strategy, attack):
        body = small_scenario(rounds=15, participation={"kind": "full"}, strategy={"lr": 0.1, **strategy},
                              attack=attack)
        return RoundLoop.from_setup(build_setup(parse_scenario(body))).run()[-1]
    flip, none = {"kind": "sign_flip", "fraction": 0.25, "scale": 4.0}, {"kind": "none"}
    assert final({}, flip)["test_loss"] > 1e3 * final({}, none)["test_loss"]
    for agg in ({"name": "median"}, {"name": "multi-krum", "f": 2}):
        held, clean = final({"aggregator": agg}, flip), final({"aggregator": agg}, none)
        assert abs(held["test_accuracy"] - clean["test_accuracy"]) < 0.1, (agg, held, clean)
        assert held["test_loss"] < 1.5 * clean["test_loss"] and held["test_accuracy"] > 0.4, (agg, held)


@pytest.mark.flower
@pytest.mark.parametrize("agg,participation", [({"name": "median"}, {"kind": "bernoulli", "p": 0.5}),
                                                ({"name": "krum", "f": 1}, {"kind": "full"})])
def test_flower_engine_equals_multiplex_with_attack_and_aggregator(agg, participation):
    from tests.flower_apps.support import assert_same_run, final, flower, reference

    body = small_scenario(rounds=4, eval={"every": 2}, participation=participation,
                          strategy={"name": "scaffold", "batch_size": 8, "aggregator": agg},
                          attack={"kind": "random", "fraction": 0.25, "std": 1.0})
    ref, ref_hist = reference(body)
    adapter, hist = flower(body)
    assert_same_run(ref, ref_hist, final(adapter), hist)
    assert torch.equal(final(adapter), ref.state.server["x"])
