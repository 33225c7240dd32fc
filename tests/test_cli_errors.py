"""Bad input: one clear line naming file, key, value and what is allowed; exit 2; nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import run_cli, small_scenario, write_scenario


def _bad(tmp_path: Path, capsys, body=None, text=None, extra_args=()):
    if text is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        path = str(path)
    else:
        path = write_scenario(tmp_path, body, "bad.yaml")
    out = tmp_path / "runs"
    code, stdout, err = run_cli(["run", path, "--out", str(out), "--quiet", *extra_args], capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not out.exists() or not os.listdir(out), "nothing may be written for bad input"
    return err


CASES = [
    ("unknown top-level key", {"roundz": 3}, ["roundz", "allowed", "rounds"]),
    ("unknown strategy key", {"strategy": {"name": "fedavg", "lrr": 0.1}}, ["strategy.lrr", "unknown key"]),
    ("bad value", {"strategy": {"name": "fedavg", "lr": -1}}, ["strategy.lr", "-1", "greater than 0"]),
    ("wrong type", {"rounds": "many"}, ["rounds", "many"]),
    ("unknown strategy", {"strategy": {"name": "fedavgg"}}, ["strategy.name", "fedavgg", "fedavg"]),
    ("unknown dataset", {"data": {"dataset": "mnistt", "clients": 4}}, ["data.dataset", "mnistt", "digits"]),
    ("unknown model", {"model": {"kind": "vgg16"}}, ["model.kind", "vgg16", "mlp"]),
    ("bad model param", {"model": {"kind": "mlp", "hidden": [0]}}, ["model.hidden", "0"]),
    ("unknown partition", {"data": {"partition": {"kind": "weird"}}}, ["data.partition.kind", "weird"]),
    ("unknown topology", {"topology": {"kind": "hypercube9"}}, ["topology.kind", "hypercube9"]),
    ("unknown participation", {"participation": {"kind": "sometimes"}}, ["participation.kind", "sometimes"]),
    ("bad participation value", {"participation": {"kind": "uniform", "clients_per_round": 99}},
     ["participation", "99"]),
    ("bad device", {"engine": {"device": "tpu"}}, ["engine.device", "tpu", "cpu"]),
    ("unknown engine", {"engine": {"kind": "warp"}}, ["engine.kind", "warp", "multiplex"]),
    ("bad engine option", {"engine": {"kind": "multiplex", "chunk_size": 0}}, ["engine.chunk_size", "0"]),
    ("dotted path that does not import", {"strategy": {"name": "nopkg.mod:thing"}},
     ["strategy.name", "nopkg.mod:thing"]),
    ("bool for a number", {"rounds": True}, ["rounds", "True"]),
    ("seed out of range", {"seed": 2**70}, ["seed", str(2**70)]),
    ("name with a path", {"name": "../escaped"}, ["name", "one path component"]),
    ("npz file missing", {"data": {"dataset": "npz", "path": "/nonexistent/x.npz",
                                   "partition": {"kind": "iid"}}}, ["/nonexistent/x.npz"]),
]


@pytest.mark.parametrize("label,over,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_scenario_values(tmp_path, capsys, label, over, needles):
    err = _bad(tmp_path, capsys, small_scenario(**over))
    assert "bad.yaml" in err
    for needle in needles:
        assert needle in err, (needle, err)


def test_invalid_yaml_names_line(tmp_path, capsys):
    err = _bad(tmp_path, capsys, text="rounds: 3\nstrategy: {name: fedavg\n")
    assert "bad.yaml" in err and "line" in err


def test_not_a_mapping(tmp_path, capsys):
    err = _bad(tmp_path, capsys, text="- just\n- a list\n")
    assert "mapping" in err


def test_missing_file(tmp_path, capsys):
    code, _, err = run_cli(["run", str(tmp_path / "nope.yaml"), "--quiet"], capsys)
    assert code == 2 and "nope.yaml" in err and "not found" in err


def test_bad_override_syntax(tmp_path, capsys):
    err = _bad(tmp_path, capsys, small_scenario(), extra_args=("--set", "strategy.lr"))
    assert "--set" in err and "dotted.key=value" in err


def test_override_with_bad_value(tmp_path, capsys):
    err = _bad(tmp_path, capsys, small_scenario(), extra_args=("--set", "strategy.local_steps=zero"))
    assert "strategy.local_steps" in err and "zero" in err


def test_bad_engine_flag(tmp_path, capsys):
    err = _bad(tmp_path, capsys, small_scenario(), extra_args=("--engine", "warp"))
    assert "engine.kind" in err and "warp" in err


def test_unknown_cli_flag_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(["run", "x.yaml", "--frobnicate"], capsys)
    assert exc.value.code == 2


def test_validate_ok_and_bad(tmp_path, capsys):
    good = write_scenario(tmp_path, small_scenario(), "good.yaml")
    code, out, _ = run_cli(["validate", good], capsys)
    assert code == 0 and out.startswith("ok:")
    bad = write_scenario(tmp_path, small_scenario(rounds=0), "bad.yaml")
    code, _, err = run_cli(["validate", bad], capsys)
    assert code == 2 and "rounds" in err


def test_gossip_needs_full_participation(tmp_path, capsys):
    err = _bad(tmp_path, capsys, small_scenario(strategy={"name": "gossip"}, topology={"kind": "ring"}))
    assert "participation.kind" in err
