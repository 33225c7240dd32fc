"""The baselines of issue 15 end to end: registered, listed, each with its ready scenario and its
planned local steps; DP-FedAvg's (epsilon, delta) and clip in metrics.jsonl as the accountant
computes them; and a run resumed from its checkpoint equal to the uninterrupted run (server
moments, the adaptive clip, FedDyn's client state, robust aggregation under attack)."""

from __future__ import annotations

import os

import pytest
import yaml

from fedsim import testing
from strategies.dp import rdp_epsilon
from tests.conftest import ROOT, read_metrics, run_cli, small_scenario, write_scenario

BASELINES = ("fedprox", "fedadam", "fedyogi", "fedadagrad", "fednova", "feddyn", "dp-fedavg")


def test_every_baseline_is_listed_with_a_scenario_and_plans_its_local_steps(capsys):
    # Execute
    code, out, _ = run_cli(["list", "strategies"], capsys)
    # Assert: listed with its paper, a ready scenario of that strategy, Strategy.local_steps set
    assert code == 0
    listed = {ln.split()[0]: ln for ln in out.splitlines() if ln and not ln.startswith(" ")}
    problem = testing.heterogeneous_quadratic(num_clients=4, dim=2, seed=0)
    for name in BASELINES:
        assert name in listed and "20" in listed[name], (name, listed.get(name))
        path = ROOT / "scenarios" / f"{name}.yaml"
        assert yaml.safe_load(path.read_text())["strategy"]["name"] == name
        assert testing.build(name, {"local_steps": 7}, problem).local_steps == 7, name
    code, out, _ = run_cli(["list", "aggregators"], capsys)
    assert code == 0 and {"median", "trimmed-mean", "krum", "multi-krum", "mean"} <= set(out.split())
    code, out, _ = run_cli(["list", "attacks"], capsys)
    assert code == 0 and {"sign_flip", "scale", "random", "none"} <= set(out.split())


def _run(tmp_path, capsys, body, name="run"):
    path = write_scenario(tmp_path, body, f"{name}.yaml")
    code, out, err = run_cli(["run", path, "--out", str(tmp_path / name), "--quiet"], capsys)
    assert code == 0, err
    return out.strip().splitlines()[-1]


DP = {"name": "dp-fedavg", "lr": 0.1, "local_steps": 3, "batch_size": 8, "clip": 0.5,
      "noise_multiplier": 1.2, "adaptive": True, "clip_count_stddev": 1.0, "delta": 1e-4}


def test_dp_fedavg_writes_epsilon_delta_and_clip_to_metrics_and_reruns_identically(tmp_path, capsys):
    # Prepare: Poisson sampling at q = 0.5 (8 clients, bernoulli), z = 1.2, delta = 1e-4
    body = small_scenario(rounds=4, participation={"kind": "bernoulli", "p": 0.5}, strategy=DP)
    # Execute
    a = read_metrics(_run(tmp_path, capsys, body, "a"))
    b = read_metrics(_run(tmp_path, capsys, body, "b"))
    # Assert: epsilon of t + 1 rounds from dp-accounting, the clip moving, a bitwise rerun
    eps = rdp_epsilon(0.5, 1.2, 1e-4)
    assert [m["dp_epsilon"] for m in a] == pytest.approx([eps(t + 1) for t in range(4)], rel=1e-12)
    spent = [m["dp_epsilon"] for m in a]
    assert all(x < y for x, y in zip(spent, spent[1:], strict=False))
    assert all(m["dp_delta"] == 1e-4 for m in a)
    assert a[0]["dp_clip"] != 0.5 and len({m["dp_clip"] for m in a}) == 4
    drop = ("wall_s",)
    assert [{k: v for k, v in m.items() if k not in drop} for m in a] == \
        [{k: v for k, v in m.items() if k not in drop} for m in b]


RESUME = [
    ("dp-fedavg-adaptive", {"strategy": DP, "participation": {"kind": "bernoulli", "p": 0.5}}),
    ("fedadam", {"strategy": {"name": "fedadam", "lr": 0.1, "local_steps": 3, "batch_size": 8,
                              "server_lr": 0.05}}),
    ("feddyn", {"strategy": {"name": "feddyn", "lr": 0.1, "local_steps": 3, "batch_size": 8}}),
    ("fednova-uneven", {"strategy": {"name": "fednova", "lr": 0.1, "batch_size": 8},
                        "work": {"kind": "uniform", "low": 0, "high": 5, "per_round": True}}),
    ("median-under-sign-flip", {"participation": {"kind": "full"},
                                "attack": {"kind": "sign_flip", "fraction": 0.25, "scale": 4.0},
                                "strategy": {"name": "fedprox", "lr": 0.1, "local_steps": 3, "batch_size": 8,
                                             "aggregator": {"name": "median"}}}),
]


@pytest.mark.parametrize("label,over", RESUME, ids=[r[0] for r in RESUME])
def test_resumed_run_equals_the_uninterrupted_run(tmp_path, capsys, label, over):
    # Prepare: 6 rounds in one go, and 3 rounds extended to 6 by `fedsim resume`
    full = read_metrics(_run(tmp_path, capsys, small_scenario(rounds=6, **over), "full"))
    short = _run(tmp_path, capsys, small_scenario(rounds=3, **over), "short")
    # Execute
    code, _, err = run_cli(["resume", short, "--set", "rounds=6", "--quiet"], capsys)
    # Assert: the same six metrics lines (all but wall-clock entries)
    assert code == 0, err
    resumed = read_metrics(short)
    assert len(resumed) == 6 and os.path.isdir(os.path.join(short, "checkpoint"))
    def strip(m):
        return {k: v for k, v in m.items() if not k.startswith("wall")}
    assert [strip(m) for m in resumed] == [strip(m) for m in full]
