"""Heterogeneous local work (`work:`): keyed budgets, the step loop's masking, and every strategy
that trains locally honouring the budget (or refusing the setting when it cannot)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim import testing
from fedsim.config import parse_scenario
from fedsim.errors import ConfigError
from fedsim.setup import build_setup
from fedsim.work import WORK
from strategies import STRATEGIES
from strategies.local import run_local
from tests.conftest import small_scenario
from topologies import build_topology

N, D = 6, 4


def _work(kind: str, sizes=None, batch_size=8, **params):
    sizes = np.full(N, 40) if sizes is None else np.asarray(sizes)
    return WORK.build(kind, params, num_clients=len(sizes), seed=3, sizes=sizes, batch_size=batch_size)


def test_uniform_budgets_are_keyed_by_client_not_by_block_or_order():
    w = _work("uniform", low=2, high=20)
    whole = w.steps(0, np.arange(N))
    assert np.array_equal(np.concatenate([w.steps(0, np.arange(3)), w.steps(0, np.arange(3, N))]), whole)
    assert np.array_equal(w.steps(0, np.array([4, 1])), whole[[4, 1]])
    assert np.array_equal(w.steps(7, np.arange(N)), whole)        # drawn once per client
    assert ((whole >= 2) & (whole <= 20)).all() and len(set(whole.tolist())) > 1
    per_round = _work("uniform", low=2, high=20, per_round=True)
    assert not np.array_equal(per_round.steps(0, np.arange(N)), per_round.steps(1, np.arange(N)))


def test_epochs_count_passes_over_each_clients_own_data():
    w = _work("epochs", sizes=[10, 40, 65, 8, 16, 1], batch_size=16, epochs=2.0)
    assert w.steps(0, np.arange(6)).tolist() == [2, 5, 9, 1, 2, 1]   # ceil(2 n_i / 16), >= 1


def test_a_row_stops_after_its_budget_and_averages_its_own_losses():
    """Row i of run_local with budget K_i equals K_i plain steps; its mean loss is over K_i steps."""
    problem = testing.heterogeneous_quadratic(num_clients=3, dim=D, seed=1, noise=0.1)
    ids = torch.arange(3)
    oracle = problem.oracle(ids, 0)
    x = torch.randn(3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    budget = torch.tensor([0, 3, 5])
    got = run_local(x, oracle, 99, 0.1, budget=budget)
    for i, k in enumerate([0, 3, 5]):
        alone = run_local(x, oracle, k, 0.1)
        torch.testing.assert_close(got.y[i], alone.y[i], rtol=0, atol=0)
        if k:
            torch.testing.assert_close(got.loss[i], alone.loss[i], rtol=0, atol=1e-15)


LOCAL = [n for n in STRATEGIES.names()
         if testing.build(n, {}, testing.heterogeneous_quadratic(N, D)).trains_locally]


def _kwargs(strat, n):
    return {"topology": build_topology("ring", {}, n=n, seed=0)} if strat.comm == "mix" else {}


@pytest.mark.parametrize("name", LOCAL)
def test_zero_budgets_leave_every_model_where_it_was(name):
    """With a shared start and no local step anywhere, a round moves no model (gossip mixes
    identical rows; server strategies receive zero updates)."""
    problem = testing.heterogeneous_quadratic(num_clients=N, dim=D, seed=2)
    strat = testing.build(name, {}, problem)
    x0 = torch.linspace(-1, 1, D, dtype=torch.float64)
    loop = testing.run(strat, problem, 2, x0=x0, work=_work("steps", steps=[0] * N), **_kwargs(strat, N))
    got = testing.final_models(loop)
    torch.testing.assert_close(got, x0.expand_as(got), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", LOCAL)
def test_nominal_budgets_reproduce_the_strategys_own_steps(name):
    problem = testing.heterogeneous_quadratic(num_clients=N, dim=D, seed=2, noise=0.05)
    strat = testing.build(name, {}, problem)
    kw = _kwargs(strat, N)
    plain = testing.run(strat, problem, 3, **kw)
    budget = _work("steps", steps=[strat.local_steps] * N)  # the strategy's own K
    same = testing.run(strat, problem, 3, work=budget, **kw)
    torch.testing.assert_close(testing.final_models(same), testing.final_models(plain), rtol=0, atol=1e-14)


def test_uneven_budgets_are_independent_of_chunking():
    problem = testing.heterogeneous_quadratic(num_clients=N, dim=D, seed=2, noise=0.05)
    work = _work("uniform", low=0, high=12)
    runs = [testing.run(testing.build("scaffold", {}, problem), problem, 5, work=work, chunk_size=c)
            for c in (None, 1, 4)]
    for other in runs[1:]:
        torch.testing.assert_close(other.state.server["x"], runs[0].state.server["x"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("over,key", [
    ({"strategy": {"name": "ef21", "batch_size": None}, "work": {"kind": "uniform"}}, "work.kind"),
    ({"work": {"kind": "steps", "steps": [1, 2]}}, "work.steps"),
    ({"work": {"kind": "uniform", "low": 5, "high": 2}}, "work.low"),
    ({"work": {"kind": "epochs", "epochs": 0}}, "work.epochs"),
    ({"work": {"kind": "nope"}}, "work.kind"),
])
def test_bad_work_settings_name_the_key(over, key):
    with pytest.raises(ConfigError) as err:
        build_setup(parse_scenario(small_scenario(**over)))
    assert err.value.key == key, str(err.value)
