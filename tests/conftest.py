"""Shared test helpers: write scenarios, run the CLI in-process, read run folders."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedsim.cli import main

ROOT = Path(__file__).resolve().parents[1]


def write_scenario(tmp_path: Path, body: dict[str, Any], name: str = "scenario.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return str(path)


def run_cli(args: list[str], capsys: Any) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def small_scenario(**over: Any) -> dict[str, Any]:
    """A tiny FedAvg scenario (seconds) that tests modify."""
    sc = {
        "name": "tiny", "seed": 3, "rounds": 3,
        "data": {"dataset": "synthetic", "clients": 8, "samples_per_client": 40,
                 "partition": {"kind": "natural"}},
        "model": {"kind": "mlp", "hidden": [16]},
        "participation": {"kind": "uniform", "clients_per_round": 4},
        "strategy": {"name": "fedavg", "lr": 0.1, "local_steps": 3, "batch_size": 8},
        "engine": {"kind": "multiplex", "dtype": "float64"},
        "eval": {"every": 1},
    }
    choosers = ("kind", "name", "dataset")
    for k, v in over.items():
        same_plugin = isinstance(v, dict) and isinstance(sc.get(k), dict) and all(
            v.get(c, sc[k].get(c)) == sc[k].get(c) for c in choosers)
        if same_plugin:
            sc[k] = {**sc[k], **v}
        else:
            sc[k] = v
    return sc


def strategy_scenario(strategy: str) -> dict[str, Any]:
    """Registered `strategy` with its default hyperparameters: 7 clients (uneven slices on 2, 3
    and 4 MPI ranks), float64, 3 rounds; gossip strategies on a ring with everyone, others with
    Bernoulli(0.5) participation."""
    from fedsim import testing

    mix = testing.build(strategy, {}, testing.heterogeneous_quadratic(4, 2)).comm == "mix"
    over: dict[str, Any] = {
        "name": f"s-{strategy}", "rounds": 3, "strategy": {"name": strategy, "batch_size": 8},
        "data": {"dataset": "synthetic", "clients": 7, "samples_per_client": 30,
                 "partition": {"kind": "natural"}}}
    if mix:
        over["topology"] = {"kind": "ring"}
    body = small_scenario(**over)
    body["strategy"] = {"name": strategy, "batch_size": 8}
    body["participation"] = {"kind": "full"} if mix else {"kind": "bernoulli", "p": 0.5}
    return body


@pytest.fixture
def scenario_file(tmp_path: Path):
    def make(**over: Any) -> str:
        return write_scenario(tmp_path, small_scenario(**over))
    return make
