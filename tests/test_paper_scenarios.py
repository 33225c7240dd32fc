"""The ready FEMNIST / Shakespeare / CIFAR-10 scenarios, end to end on small local stand-ins.

Each stand-in is written in the real source's format (flwrlabs/femnist as a save_to_disk
directory, flwrlabs/shakespeare as its CSV, uoft-cs/cifar10 as hub-layout parquet files, LEAF
JSON) and the scenario file itself is run through the CLI with only the data path and the
sizes overridden: each runs its own paper model (femnist-cnn, char-lstm, cifar-cnn).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import yaml  # noqa: E402

from tests.conftest import ROOT, read_metrics, run_cli  # noqa: E402
from tests.fixtures import datasets as fx  # noqa: E402

PAPER = ROOT / "scenarios" / "paper"


def _run(capsys, tmp_path, scenario: str, sets: list[str]) -> tuple[str, list[dict]]:
    args = ["run", str(PAPER / scenario), "--quiet", "--out", str(tmp_path / "runs"),
            "--set", "engine.device=cpu"]
    for s in sets:
        args += ["--set", s]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    run_dir = out.strip().splitlines()[-1]
    return run_dir, read_metrics(run_dir)


def test_femnist_scenario_on_a_local_copy(tmp_path, capsys) -> None:
    data = str(tmp_path / "femnist")
    fx.femnist_hf(writers=6, per_writer=30, classes=10).save_to_disk(data)
    run_dir, metrics = _run(capsys, tmp_path, "femnist.yaml", [
        f"data.path={data}", "data.clients=6", "data.partition.select=all",
        "rounds=8", "eval.every=4", "participation.clients_per_round=3", "strategy.local_steps=5"])
    cfg = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    assert cfg["data"]["client_column"] == "writer_id" and cfg["data"]["partition"]["holdout"] == 0.0
    assert cfg["model"]["kind"] == "femnist-cnn"
    assert [m["round"] for m in metrics] == [4, 8]
    assert metrics[-1]["clients_evaluated"] == 6  # every writer on its own 10 %
    # images and labels arrive paired: the class templates are learnt (chance: 0.1; the
    # femnist-cnn reaches 0.78 in these 40 steps, labels shuffled against images stay near 0.1)
    assert metrics[-1]["test_accuracy"] >= 0.5


def test_shakespeare_scenario_on_a_local_csv(tmp_path, capsys) -> None:
    data = fx.shakespeare_csv(str(tmp_path / "shakespeare"), roles=5, per_role=30)
    _, metrics = _run(capsys, tmp_path, "shakespeare.yaml", [
        f"data.path={data}", "data.clients=5", "data.partition.select=all",
        "rounds=4", "eval.every=2", "participation.clients_per_round=2",
        f"data.cache_dir={tmp_path / 'cache'}", "strategy.lr=0.05", "strategy.local_steps=3"])
    assert [m["round"] for m in metrics] == [2, 4] and metrics[-1]["test_loss"] is not None


def test_shakespeare_leaf_scenario_on_leaf_json(tmp_path, capsys) -> None:
    users: dict = {}
    for role, x, y in fx.shakespeare_lines(roles=4, per_role=12):
        users.setdefault(role, ([], []))
        users[role][0].append(x)
        users[role][1].append(y)
    train = {u: (x[:9], y[:9]) for u, (x, y) in users.items()}
    test = {u: (x[9:], y[9:]) for u, (x, y) in users.items()}
    root = tmp_path / "leaf" / "data"
    fx.leaf_json(str(root / "train" / "all_data_niid_0_keep_0_train_9.json"), train)
    fx.leaf_json(str(root / "test" / "all_data_niid_0_keep_0_test_9.json"), test)
    _, metrics = _run(capsys, tmp_path, "shakespeare-leaf.yaml", [
        f"data.path={root}", "data.clients=3", "rounds=2", "eval.every=1",
        "participation.clients_per_round=2", "strategy.lr=0.05", "strategy.local_steps=2"])
    assert len(metrics) == 2


@pytest.mark.parametrize("scenario", ["cifar10-dir0.1.yaml", "cifar10-dir0.5.yaml"])
def test_cifar10_scenarios_on_local_parquet(tmp_path, capsys, scenario: str) -> None:
    data = fx.save_parquet(fx.cifar_hf(n_train=600, n_test=100), str(tmp_path / "cifar10"))
    run_dir, metrics = _run(capsys, tmp_path, scenario, [
        f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}", "data.clients=20",
        "data.partition.min_size=5", "rounds=2", "eval.every=1",
        "strategy.local_steps=2", "strategy.batch_size=16"])
    cfg = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    assert cfg["data"]["mean"] == [0.4914, 0.4822, 0.4465]
    assert len(metrics) == 2 and 0 <= metrics[-1]["test_accuracy"] <= 1


def test_every_download_scenario_is_covered_here() -> None:
    """The scenarios that test_quickstart cannot validate (their data is downloaded) are the
    ones this file runs on stand-ins."""
    covered = {"femnist.yaml", "shakespeare.yaml", "shakespeare-leaf.yaml", "cifar10-dir0.1.yaml",
               "cifar10-dir0.5.yaml"}
    downloads = set()
    for f in (ROOT / "scenarios").glob("**/*.yaml"):
        data = (yaml.safe_load(f.read_text()) or {}).get("data", {})
        if data.get("dataset") in ("hf", "leaf") and not os.path.exists(data.get("path", "")):
            downloads.add(f.name)
    assert downloads == covered
