"""A user strategy in its own module (examples/my_strategy.py) runs by dotted path through the
CLI, through an entry point, and passes `fedsim.testing`'s conformance checks."""

from __future__ import annotations

import json
import os
from importlib import metadata

import pytest
import torch

from fedsim import testing
from fedsim.registry import Registry
from tests.conftest import ROOT, read_metrics, run_cli, small_scenario, write_scenario

PATH = "examples.my_strategy:factory"


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # `examples` lives at the repository root


def test_dotted_path_strategy_runs_through_the_cli(tmp_path, capsys):
    # Prepare
    sc = write_scenario(tmp_path, small_scenario(strategy={
        "name": PATH, "lr": 0.1, "local_steps": 3, "max_norm": 0.5, "batch_size": 8}))
    # Execute
    code, out, err = run_cli(["run", sc, "--out", str(tmp_path / "runs"), "--quiet"], capsys)
    # Assert
    assert code == 0, err
    path = out.strip().splitlines()[-1]
    assert [r["round"] for r in read_metrics(path)] == [1, 2, 3]
    summary = json.load(open(os.path.join(path, "summary.json")))
    assert summary["status"] == "ok" and PATH in json.dumps(summary["strategy"])


def test_dotted_path_strategy_parameters_are_validated(tmp_path, capsys):
    sc = write_scenario(tmp_path, small_scenario(strategy={"name": PATH, "max_nrom": 0.5}))
    code, out, err = run_cli(["run", sc, "--out", str(tmp_path / "runs"), "--quiet"], capsys)
    assert code == 2 and "max_nrom" in err and "max_norm" in err


def test_user_strategy_passes_the_test_kit():
    from examples.my_strategy import factory

    testing.check_strategy(lambda: factory(lr=0.1, local_steps=3),
                           participation=testing.bernoulli([0.6] * 8, seed=1))


def test_clipping_one_round_then_fedavg_fixed_point():
    """Drift quadratic (h = [1, 4], c = [0, 1]), lr 0.1, 10 full-batch steps, x0 = 0:
    Delta = [0, 1 - 0.6**10] = [0, 0.99395]; clipped to 0.5 -> x1 = (0 + 0.5) / 2 = 0.25.
    Near the fixed point updates are small, so clipping stops mattering: FedAvg's 0.6041260077.
    """
    from examples.my_strategy import factory

    # Prepare
    make = lambda: factory(lr=0.1, local_steps=10, max_norm=0.5)  # noqa: E731
    # Execute
    one = testing.run(make(), testing.drift_quadratic(), rounds=1)
    many = testing.run(make(), testing.drift_quadratic(), rounds=400)
    # Assert
    torch.testing.assert_close(one.state.server["x"], torch.tensor([0.25], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    assert abs(float(many.state.server["x"][0]) - 0.6041260077) < 1e-9


def test_entry_point_group_registers_by_name(monkeypatch):
    # Prepare: an installed package declaring
    #   [project.entry-points."fedsim.strategies"]  clipped = "examples.my_strategy:factory"
    ep = metadata.EntryPoint(name="clipped", value=PATH, group="fedsim.strategies")
    monkeypatch.setattr(metadata, "entry_points",
                        lambda group=None: [ep] if group == "fedsim.strategies" else [])
    reg = Registry("strategies")
    # Execute
    strat = reg.build("clipped", {"lr": 0.2, "max_norm": 2.0})
    # Assert
    assert "clipped" in reg.names() and strat.comm == "reduce"
    with pytest.raises(Exception, match="max_nrom"):
        reg.build("clipped", {"max_nrom": 1.0})
