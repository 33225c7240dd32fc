"""Scenario settings that used to be silently ignored or coerced (issue 18): each is bad input,
exit 2 with one line naming the file, the key and the value; `validate` agrees with `run`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, run_cli, small_scenario, write_scenario


def bad(tmp_path: Path, capsys, body=None, text=None, sets=(), file="bad.yaml") -> str:
    """Run and validate the scenario: both exit 2 with the same one line, nothing is written."""
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    else:
        write_scenario(tmp_path, body, "bad.yaml")
    over = [a for s in sets for a in ("--set", s)]
    out = tmp_path / "runs"
    errs = []
    for cmd in (["run", str(path), "--out", str(out), "--quiet"], ["validate", str(path)]):
        code, _, err = run_cli(cmd + over, capsys)
        assert code == 2, (cmd[0], err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert file in err
        errs.append(err)
    assert errs[0] == errs[1], "validate and run disagree"
    assert not out.exists() or not os.listdir(out)
    return errs[0]


def test_duplicate_keys_are_refused_with_both_lines(tmp_path, capsys):
    text = "rounds: 3\nseed: 1\nrounds: 30\n"
    err = bad(tmp_path, capsys, text=text)
    assert "duplicate key at line 3" in err and "first at line 1" in err and "rounds" in err


def test_duplicate_nested_keys_are_refused(tmp_path, capsys):
    text = "strategy:\n  name: fedavg\n  lr: 0.1\n  lr: 10\n"
    err = bad(tmp_path, capsys, text=text)
    assert "duplicate key at line 4" in err and "lr" in err


@pytest.mark.parametrize("sets,needles", [
    (["rounds=true"], ["rounds", "True"]),
    (["data.clients=false"], ["data.clients", "False"]),
    (["strategy.local_steps=true"], ["strategy.local_steps", "not a boolean"]),
    (["strategy.lr=true"], ["strategy.lr", "not a boolean"]),
    (["seed=1180591620717411303424"], ["seed", "1180591620717411303424", "less than"]),
    (["seed=-1"], ["seed", "-1"]),
    (["strategy.lr=.inf"], ["strategy.lr", "finite", "inf"]),
    (["strategy.lr=.nan"], ["strategy.lr", "finite", "nan"]),
    (["eval.every=.inf"], ["eval.every"]),
    (["model.nonconvex_reg=.nan"], ["model.nonconvex_reg"]),
    (["topology.kind=ring"], ["topology.kind", "ring", "aggregates on a server"]),
    (["topology.kind=complete"], ["topology.kind", "complete", "ignored"]),
])
def test_coerced_or_ignored_settings_are_bad_input(tmp_path, capsys, sets, needles):
    err = bad(tmp_path, capsys, small_scenario(), sets=sets)
    for needle in needles:
        assert needle in err, (needle, err)


def test_infinite_default_may_stay_infinite():
    """A parameter whose default is inf accepts inf (a resolved config.yaml holding it loads
    again for `fedsim resume`); NaN never; a finite default refuses inf."""
    from fedsim.errors import ConfigError
    from fedsim.registry import validate_kwargs

    def factory(*, clip: float = float("inf"), lr: float = 0.1, steps: int = 1) -> None:
        return None
    assert validate_kwargs(factory, {"clip": float("inf")})["clip"] == float("inf")
    for params, key in (({"clip": float("nan")}, "clip"), ({"lr": float("inf")}, "lr"),
                        ({"steps": True}, "steps"), ({"lr": False}, "lr")):
        with pytest.raises(ConfigError) as info:
            validate_kwargs(factory, params)
        assert info.value.key == key
    assert validate_kwargs(factory, {"lr": 1, "steps": 2}) == {"clip": float("inf"), "lr": 1, "steps": 2}


def _gossip(**over):
    body = small_scenario(strategy={"name": "gossip", "lr": 0.1}, **over)
    body["participation"] = {"kind": "full"}
    return body


def test_gossip_on_a_disconnected_edge_list_is_refused(tmp_path, capsys):
    edges = tmp_path / "two.txt"
    edges.write_text("0 1\n1 2\n2 3\n3 0\n4 5\n5 6\n6 7\n7 4\n")  # two 4-cycles
    err = bad(tmp_path, capsys, _gossip(topology={"kind": "edge_list", "path": str(edges)}))
    assert "disconnected (2 components)" in err and "topology.path" in err and "two.txt" in err


def test_gossip_on_a_connected_edge_list_runs(tmp_path, capsys):
    edges = tmp_path / "one.txt"
    edges.write_text("0 1\n1 2\n2 3\n3 0\n4 5\n5 6\n6 7\n7 4\n0 4\n")
    path = write_scenario(tmp_path, _gossip(topology={"kind": "edge_list", "path": str(edges)}))
    code, _, err = run_cli(["validate", path], capsys)
    assert code == 0, err


def test_gossip_on_a_disconnected_random_graph_is_refused(tmp_path, capsys):
    err = bad(tmp_path, capsys, _gossip(topology={"kind": "erdos_renyi", "p": 0.01}))
    assert "no connected graph" in err and "topology.p" in err


SERVER_SYSTEM = [("dropout", 0.2, "0.2"), ("over_selection", 1.5, "1.5"),
                 ("deadline", {"seconds": 2.0}, "{'seconds': 2.0, 'policy': 'drop'}"),
                 ("network", "allreduce", "'allreduce'"),
                 ("asynchrony", {"concurrency": 2}, "{'concurrency': 2, 'buffer': 1")]


@pytest.mark.parametrize("key,value,shown", SERVER_SYSTEM)
def test_server_system_settings_on_gossip_are_bad_input(tmp_path, capsys, key, value, shown):
    """Stragglers, all-reduce networks and asynchrony would be ignored by gossip nodes."""
    err = bad(tmp_path, capsys, _gossip(topology={"kind": "ring"}, system={key: value}))
    assert f"bad.yaml: system.{key}: gossip nodes all take part every round" in err, err
    assert f"(got {shown}" in err and err.rstrip().endswith("allowed: the default"), err


@pytest.mark.flower
@pytest.mark.parametrize("key,value,shown", SERVER_SYSTEM)
def test_server_system_settings_on_a_flower_strategy_are_bad_input(tmp_path, capsys, key, value, shown):
    """A Flower strategy object samples its clients itself: fedsim's straggler model is ignored."""
    body = small_scenario(participation={"kind": "full"}, engine={"kind": "flower"}, system={key: value},
                          strategy={"name": "flower", "class": "flwr.serverapp.strategy.FedAvg",
                                    "lr": 0.1, "local_steps": 3, "batch_size": 8})
    err = bad(tmp_path, capsys, body)
    assert f"bad.yaml: system.{key}: a Flower strategy samples its clients itself" in err, err
    assert f"(got {shown}" in err and err.rstrip().endswith("allowed: the default"), err


ASYNC = {"concurrency": 2}


@pytest.mark.parametrize("key,value,shown", SERVER_SYSTEM[:4])
def test_synchronous_round_settings_with_asynchrony_are_bad_input(tmp_path, capsys, key, value, shown):
    """FedBuff / FedAsync have no rounds to drop clients from, over-select, time out or all-reduce."""
    err = bad(tmp_path, capsys, small_scenario(system={"asynchrony": ASYNC, key: value}))
    assert f"bad.yaml: system.{key}: a synchronous-round setting, which asynchronous aggregation" in err, err
    assert f"(got {shown})" in err and err.rstrip().endswith("allowed: the default"), err


def test_server_system_keys_written_out_at_their_defaults_are_accepted(tmp_path, capsys):
    """Only a value off the default is refused: the defaults spelled out pass with asynchrony and
    on gossip (a check on "key present" or on a wrong default would refuse these)."""
    defaults = {"dropout": 0, "over_selection": 1.0, "deadline": None, "network": "star"}
    for body in (small_scenario(system={**defaults, "asynchrony": ASYNC}),
                 _gossip(topology={"kind": "ring"}, system={**defaults, "asynchrony": None})):
        code, out, err = run_cli(["validate", write_scenario(tmp_path, body)], capsys)
        assert code == 0 and out.startswith("ok: "), err


@pytest.mark.parametrize("kind,needles", [
    ("tests.reliability_plugins:WrongOutputs", ["outputs (2, 3)", "10 classes", "model.kind"]),
    ("tests.reliability_plugins:WrongInputs", ["does not accept", "(60,)", "model.kind"]),
])
def test_model_that_does_not_fit_the_data_is_bad_input(tmp_path, capsys, monkeypatch, kind, needles):
    """`run` and `validate` run the model once on two training rows after set-up (building a
    scenario never runs it): the same line, exit 2, no run folder (tests/test_bad_input_model.py
    drives real processes, sweeps and MPI ranks)."""
    monkeypatch.syspath_prepend(str(ROOT))
    err = bad(tmp_path, capsys, small_scenario(model={"kind": kind}))
    for needle in needles:
        assert needle in err, (needle, err)


def test_nan_features_are_bad_input(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    x[17, 1] = np.nan
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.arange(40) % 2, x_test=x[:5] * 0,
             y_test=np.zeros(5, dtype=np.int64))
    err = bad(tmp_path, capsys, small_scenario(data={"dataset": "npz", "path": str(tmp_path / "d.npz"),
                                                    "clients": 4, "partition": {"kind": "iid"}}),
              file="d.npz")
    assert "d.npz" in err and "x_train" in err and "NaN or infinite" in err and "row 17" in err


def test_empty_test_set_reports_null_not_zero(tmp_path, capsys):
    """No test data (test_fraction 0): test metrics are null, never a 0.0 that looks measured."""
    body = small_scenario(rounds=2, data={"test_fraction": 0.0})
    path = write_scenario(tmp_path, body)
    code, out, err = run_cli(["run", path, "--out", str(tmp_path / "runs"), "--quiet"], capsys)
    assert code == 0, err
    lines = [json.loads(ln) for ln in (Path(out.strip()) / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    assert all(ln["test_loss"] is None and ln["test_accuracy"] is None for ln in lines)
    assert all(ln["train_loss"] is not None for ln in lines)
    summary = json.loads((Path(out.strip()) / "summary.json").read_text())
    assert summary["best_test_accuracy"] is None and summary["final"]["test_accuracy"] is None


def test_npz_without_a_test_split_needs_a_test_fraction(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.normal(size=(40, 3)).astype(np.float32),
             y_train=np.arange(40) % 2)
    err = bad(tmp_path, capsys, small_scenario(data={"dataset": "npz", "path": str(tmp_path / "d.npz"),
                                                    "clients": 4, "partition": {"kind": "iid"}}),
              file="d.npz")
    assert "data.test_fraction" in err and "no test split" in err
