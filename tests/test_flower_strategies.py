"""Flower's own strategy objects on fedsim's clients: `strategy: {name: flower, class: ...}`.

8 float64 clients, full participation, the Flower engine in-process (multiplexed unless said).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fedsim.config import parse_scenario
from fedsim.errors import ConfigError
from fedsim.setup import build_setup
from tests.conftest import run_cli, small_scenario, write_scenario
from tests.flower_apps.support import assert_same_run, final, flower, reference, run_exported, same_metrics

pytestmark = pytest.mark.flower
torch.set_num_threads(1)
LOCAL = {"lr": 0.1, "local_steps": 3, "batch_size": 8}
SKEWED = {"size_skew": 1.0}  # clients of different sizes: weighting by num-examples matters


def flwr_case(cls: str, **kwargs) -> dict:
    """4 rounds of the small scenario driven by flwr.serverapp.strategy.<cls>(**kwargs)."""
    strat = {"name": "flower", "class": f"flwr.serverapp.strategy.{cls}", **LOCAL, **kwargs}
    return small_scenario(participation={"kind": "full"}, rounds=4, eval={"every": 2},
                          data=SKEWED, strategy=strat, engine={"kind": "flower", "dtype": "float64"})


def test_flower_fedavg_equals_fedsim_fedavg():
    """Flower's FedAvg (every node, weights = num-examples, models averaged) is fedsim's fedavg
    with sample weighting, server_lr 1 and full participation: the clients run the same local
    SGD on the same keyed minibatches; only the summation order of the average differs."""
    ours = small_scenario(participation={"kind": "full"}, rounds=4, eval={"every": 2}, data=SKEWED,
                          strategy={"name": "fedavg", "weighting": "samples", "server_lr": 1.0, **LOCAL})
    ref, ref_hist = reference(ours)
    driver, hist = flower(flwr_case("FedAvg", fraction_train=1.0, fraction_evaluate=0.0))
    assert len(set(driver.setup.sizes.tolist())) > 1
    assert_same_run(ref, ref_hist, final(driver), hist)
    p = driver.setup.model.spec.size
    assert hist[-1]["bytes_up"] == hist[-1]["bytes_down"] == 4 * 8 * p * 8  # 4 rounds x 8 nodes
    assert hist[-1]["flower_bytes_up"] > hist[-1]["bytes_up"]


def test_uniform_weighting_is_not_flower_fedavg():
    """The test above can fail: fedsim's fedavg weighted uniformly is a different average."""
    ours = small_scenario(participation={"kind": "full"}, rounds=2, eval={"every": 2}, data=SKEWED,
                          strategy={"name": "fedavg", "weighting": "uniform", **LOCAL})
    ref, _ = reference(ours)
    driver, _ = flower({**flwr_case("FedAvg", fraction_evaluate=0.0), "rounds": 2})
    assert (final(driver) - ref.state.server["x"]).abs().max() > 1e-6


@pytest.mark.parametrize("cls,kwargs", [
    ("FedAvg", {"fraction_train": 0.5}), ("FedAdam", {"eta": 0.01}), ("FedProx", {"proximal_mu": 0.5}),
    ("FedTrimmedAvg", {"beta": 0.25}), ("Krum", {"num_malicious_nodes": 1}),
    ("DifferentialPrivacyServerSideFixedClipping",
     {"noise_multiplier": 0.5, "clipping_norm": 1.0, "num_sampled_clients": 8,
      "strategy": {"class": "flwr.serverapp.strategy.FedAvg"}})])
def test_flower_strategies_are_deterministic_and_multiplexed(cls, kwargs):
    """Reruns are bit-identical whatever the global RNG state (Flower samples with `random`, the
    DP wrapper's noise uses numpy's); per-message delivery gives the same bits."""
    body = flwr_case(cls, **kwargs)
    random.seed(123), np.random.seed(7)
    a, ha = flower(body)
    random.seed(99), np.random.seed(1)
    b, hb = flower(body)
    c, _ = flower(body, multiplex=False)
    assert torch.equal(final(a), final(b)) and torch.equal(final(a), final(c))
    assert [m["test_loss"] for m in ha] == [m["test_loss"] for m in hb]
    assert torch.isfinite(final(a)).all() and ha[-1]["test_accuracy"] is not None


def _sampled(body: dict) -> list[list[int]]:
    """Partition ids each round's train messages went to."""
    driver_cls = __import__("fedsim.flower.driver", fromlist=["SeededStrategy"]).SeededStrategy
    seen, orig = [], driver_cls.configure_train

    def spy(self, server_round, arrays, config, grid):
        msgs = orig(self, server_round, arrays, config, grid)
        seen.append(sorted(self.fed.pid_of[m.metadata.dst_node_id] for m in msgs))
        return msgs
    driver_cls.configure_train = spy
    try:
        flower(body)
    finally:
        driver_cls.configure_train = orig
    return seen


def test_flower_sampling_is_seeded_per_round_from_the_scenario_seed():
    """fraction_train 0.5 samples 4 of 8 nodes, different nodes in different rounds, the same
    on a rerun, other nodes under another seed."""
    body = flwr_case("FedAvg", fraction_train=0.5, fraction_evaluate=0.0)
    first = _sampled(body)
    assert [len(s) for s in first] == [4] * 4 and len({tuple(s) for s in first}) > 1
    assert _sampled(body) == first
    assert _sampled({**body, "seed": 11}) != first


def test_fedprox_adds_the_proximal_term_and_mu_zero_is_fedavg():
    from fedsim.flower.plugin import _proximal_sgd

    a, _ = flower(flwr_case("FedProx", proximal_mu=0.0, fraction_evaluate=0.0))
    b, _ = flower(flwr_case("FedAvg", fraction_evaluate=0.0))
    c, _ = flower(flwr_case("FedProx", proximal_mu=1.0, fraction_evaluate=0.0))
    assert torch.equal(final(a), final(b)) and not torch.equal(final(b), final(c))

    class Quadratic:  # f(y) = |y|^2 / 2: gradient y
        def __call__(self, y, step):
            return (y ** 2).sum(1) / 2, y.clone()
    x = torch.tensor([[2.0, -4.0]], dtype=torch.float64)
    y, loss = _proximal_sgd(x, Quadratic(), steps=2, lr=0.5, mu=1.0)
    # step 1: y1 = x - 0.5 (x + 0) = [1, -2]; step 2: y2 = y1 - 0.5 (y1 + (y1 - x)) = [1, -2]
    # (plain SGD would reach [0.5, -1]); mean loss (10 + 2.5) / 2
    assert torch.equal(y, torch.tensor([[1.0, -2.0]], dtype=torch.float64))
    assert torch.equal(loss, torch.tensor([6.25], dtype=torch.float64))


def test_client_side_evaluation_on_local_test_splits():
    """fraction_evaluate 1: each node scores the global model on its own test split; Flower
    averages by num-examples = test samples, i.e. sum of losses / sum of counts."""
    driver, hist = flower(flwr_case("FedAvg"))
    setup, x = driver.setup, final(driver)
    ids = torch.arange(setup.num_clients)
    loss, correct, count = setup.problem().evaluate_clients(x.expand(len(ids), -1), ids)
    assert hist[-1]["flower_eval_loss"] == pytest.approx(float(loss.sum() / count.sum()), rel=1e-12)
    assert hist[-1]["flower_eval_acc"] == pytest.approx(float(correct.sum() / count.sum()), rel=1e-12)


def test_client_side_evaluation_without_test_splits_is_the_local_training_loss():
    """Clients without test data (digits, IID) report the full-batch training loss of the
    global model, weighted by their training samples."""
    body = {**flwr_case("FedAvg"), "data": {"dataset": "digits", "clients": 8,
                                            "partition": {"kind": "iid", "size_skew": 1.0}}}
    driver, hist = flower(body)
    setup, x = driver.setup, final(driver)
    assert setup.problem().client_test is None and "flower_eval_acc" not in hist[-1]
    ids = torch.arange(setup.num_clients)
    loss = setup.problem().oracle(ids, 0).full(x.expand(len(ids), -1))[0].double()
    w = torch.as_tensor(setup.sizes, dtype=torch.float64)
    assert hist[-1]["flower_eval_loss"] == pytest.approx(float((loss * w).sum() / w.sum()), rel=1e-12)


@pytest.mark.parametrize("strategy,over,key,needle", [
    ({"class": "collections.OrderedDict"}, {}, "strategy.class", "not a (concrete) Flower strategy"),
    ({"class": "flwr.serverapp.strategy.Strategy"}, {}, "strategy.class", "not a (concrete)"),
    ({"class": "flwr.serverapp.strategy.NoSuch"}, {}, "strategy.class", "cannot import"),
    ({}, {}, "strategy.class", "needs its class"),
    ({"class": "flwr.serverapp.strategy.FedAdam", "etaa": 0.1}, {}, "strategy.etaa", "unknown key"),
    ({"class": "flwr.serverapp.strategy.FedAvg", "fraction_train": "half"}, {},
     "strategy.fraction_train", "valid number"),
    ({"class": "flwr.serverapp.strategy.FedAvg", "lr": 0}, {}, "strategy.lr", "greater than 0"),
    ({"class": "flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping",
      "noise_multiplier": 0.1, "clipping_norm": 1.0, "num_sampled_clients": 8,
      "strategy": {"class": "flwr.serverapp.strategy.FedAvg", "bogus": 1}}, {},
     "strategy.strategy.bogus", "unknown key"),
    ({"class": "flwr.serverapp.strategy.FedAvg"}, {"topology": {"kind": "ring"}},
     "topology.kind", "no gossip topology"),
    ({"class": "flwr.serverapp.strategy.FedAvg"}, {"engine": {"kind": "multiplex"}},
     "engine.kind", "runs on the Flower engine"),
    ({"class": "flwr.serverapp.strategy.FedAvg"}, {"participation": {"kind": "bernoulli", "p": 0.5}},
     "participation.kind", "samples the nodes itself"),
    ({"class": "flwr.serverapp.strategy.FedAvg", "compressor": {"name": "top_k", "ratio": 0.1}}, {},
     "strategy.compressor", "full models"),
])
def test_bad_flower_strategies_exit_2(strategy, over, key, needle, tmp_path, capsys):
    body = small_scenario(participation={"kind": "full"}, engine={"kind": "flower"},
                          strategy={"name": "flower", **strategy})
    body.update(over)
    code, out, err = run_cli(["validate", write_scenario(tmp_path, body)], capsys)
    assert code == 2, err
    assert f"{key}:" in err and needle in err and "Traceback" not in err


def test_resolved_flower_scenario_round_trips():
    """The resolved strategy section (every default of the class filled) re-validates to itself."""
    from fedsim.config import to_dict

    sc = parse_scenario(flwr_case("FedAdam", eta=0.02))
    resolved = to_dict(sc)
    assert resolved["strategy"]["eta"] == 0.02 and resolved["strategy"]["beta_1"] == 0.9
    assert to_dict(parse_scenario(resolved)) == resolved
    assert build_setup(sc).strategy.payload(5) == {"x": (5,)}


def test_exported_app_with_a_flower_strategy_runs_like_the_engine(tmp_path, capsys):
    """export-flower of a `name: flower` scenario: its own apps reproduce the engine's metrics."""
    body = {**flwr_case("FedAdam", eta=0.02, fraction_train=0.5), "rounds": 2}
    path = write_scenario(tmp_path, body)
    code, _, err = run_cli(["export-flower", path, str(tmp_path / "app")], capsys)
    assert code == 0, err
    _, hist = flower(body)
    assert same_metrics(hist, run_exported(str(tmp_path / "app"), 8))


def test_a_users_own_strategy_subclass_drives_the_clients():
    """A FedAvg subclass (tests/flower_apps/custom_strategy.py) with its own keyword and FedAvg's
    passed through **kwargs: validated against both, and server_lr 1 is exactly FedAvg."""
    cls = "tests.flower_apps.custom_strategy.FedAvgServerLr"
    body = {**flwr_case("FedAvg", fraction_evaluate=0.0), "rounds": 2}
    mine = lambda **kw: {**body, "strategy": {**body["strategy"], "class": cls, **kw}}  # noqa: E731
    sc = parse_scenario(mine(server_lr=0.5))
    assert sc.strategy.params()["server_lr"] == 0.5 and sc.strategy.params()["fraction_evaluate"] == 0
    same, _ = flower(mine(server_lr=1.0))
    fedavg, _ = flower(body)
    half, _ = flower(mine(server_lr=0.5))
    torch.testing.assert_close(final(same), final(fedavg), rtol=0, atol=1e-15)
    assert (final(half) - final(fedavg)).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="server_lrr"):
        parse_scenario(mine(server_lrr=0.5))
