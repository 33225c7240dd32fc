"""Shared test helpers: write scenarios, run the CLI in-process, read run folders."""

from __future__ import annotations

import contextlib
import json
import os
import signal
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



WATCHED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def dispositions() -> dict[int, tuple[Any, bool | None]]:
    """(Python's handler, whether the kernel ignores it) of SIGINT, SIGTERM and SIGHUP. The
    kernel's ignore mask (/proc/self/status SigIgn; None off Linux) is what child processes
    inherit, and it also sees a native library's `signal(SIG_IGN)` that Python's record misses."""
    mask = None
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as fh:
            mask = next((int(ln.split()[1], 16) for ln in fh if ln.startswith("SigIgn:")), None)
    return {int(s): (signal.getsignal(s), None if mask is None else bool(mask >> (int(s) - 1) & 1))
            for s in WATCHED_SIGNALS}


@pytest.fixture(autouse=True)
def _signals_left_as_found():
    """Fail a test that leaves a signal disposition changed (a library must put back what it
    changes: a SIGINT left ignored is inherited by every process started later), then put them
    back so that the following tests start clean."""
    before = dispositions()
    yield
    after = dispositions()
    if after != before:
        for sig, (handler, _) in before.items():
            if handler is not None:
                signal.signal(sig, handler)
        changed = {signal.Signals(s).name: (before[s], after[s]) for s in before if before[s] != after[s]}
        pytest.fail(f"the test changed signal dispositions, (handler, ignored) before and after: {changed}")
