"""Per-client test metrics in the metrics line (issue 12): what the round kernel reports, checked
by hand against `evaluate_clients`, and the same figures on multiplex, MPI and Flower."""

from __future__ import annotations

import glob
import sys

import numpy as np
import pytest
import torch

from fedsim.client_metrics import EVAL_BLOCK, client_metrics
from fedsim.config import parse_scenario
from fedsim.engines.loop import RoundLoop
from fedsim.setup import build_setup
from tests.conftest import read_metrics, small_scenario, write_scenario
from tests.flower_apps.support import flower

CLIENT_KEYS = ("client_acc_mean", "client_acc_weighted", "client_acc_worst10", "client_acc_std",
               "client_acc_p10", "client_acc_median", "client_acc_p90", "client_loss", "clients_evaluated")
HOLDOUT = {"dataset": "digits", "clients": 9,
           "partition": {"kind": "dirichlet", "alpha": 0.5, "holdout": 0.25}}


def _gossip(**over) -> dict:
    return small_scenario(strategy={"name": "gossip", "lr": 0.1, "batch_size": 8}, topology={"kind": "ring"},
                          participation={"kind": "full"}, **over)


def test_percentiles_by_hand():
    acc = np.array([0.0, 0.25, 0.5, 1.0, 0.75])  # sorted: 0, .25, .5, .75, 1
    m = client_metrics(acc * 4, np.full(5, 4.0))
    assert m["client_acc_median"] == 0.5
    assert m["client_acc_p10"] == pytest.approx(0.1)  # 10 % of the way from 0 to 0.25 x 4 gaps
    assert m["client_acc_p90"] == pytest.approx(0.9)


@pytest.mark.parametrize("body", [small_scenario(), small_scenario(data=HOLDOUT), _gossip()],
                         ids=["server-natural", "server-holdout", "gossip-natural"])
def test_metrics_line_scores_every_client_on_its_own_split(body):
    """Server strategies: the server model on every client's split; gossip: each node's own model."""
    loop = RoundLoop.from_setup(build_setup(parse_scenario(body)))
    last = loop.run()[-1]
    prob, strat, n = loop.problem, loop.strategy, loop.num_clients
    ids = torch.arange(n)
    if strat.comm == "reduce":
        models = loop.state.server[strat.model_key].expand(n, -1)
    else:
        models = loop.state.store.gather(ids)[strat.model_key]
    loss, correct, count = prob.evaluate_clients(models, ids)
    want = client_metrics(correct, count, loss)
    assert want["clients_evaluated"] == n and float(count.sum()) > 0
    for k in CLIENT_KEYS:
        assert last[k] == pytest.approx(want[k], rel=1e-12), k
    if strat.comm == "mix":  # node models differ: their own splits are not the global test of the mean
        mean = models.mean(0, keepdim=True).expand(n, -1)
        other = client_metrics(*prob.evaluate_clients(mean, ids)[1:])
        assert other["client_acc_mean"] != want["client_acc_mean"]


def test_no_client_keys_without_per_client_test_splits():
    body = small_scenario(data={"dataset": "digits", "clients": 6, "partition": {"kind": "iid"}})
    last = RoundLoop.from_setup(build_setup(parse_scenario(body))).run()[-1]
    assert last["test_accuracy"] is not None and not set(CLIENT_KEYS) & set(last)


def test_more_clients_than_one_eval_block_are_all_scored():
    body = small_scenario(data={"dataset": "synthetic", "clients": EVAL_BLOCK + 6, "samples_per_client": 12,
                                "partition": {"kind": "natural"}}, rounds=1)
    last = RoundLoop.from_setup(build_setup(parse_scenario(body))).run()[-1]
    assert last["clients_evaluated"] == EVAL_BLOCK + 6


@pytest.mark.flower
@pytest.mark.parametrize("body", [small_scenario(data=HOLDOUT), small_scenario(), _gossip()],
                         ids=["server", "server-natural", "gossip"])
def test_flower_reports_the_multiplex_client_metrics(body):
    ref = RoundLoop.from_setup(build_setup(parse_scenario(body))).run()
    _, got = flower(body)
    assert len(got) == len(ref)
    for a, b in zip(ref, got, strict=True):
        for k in (*CLIENT_KEYS, "test_loss", "test_accuracy"):
            assert b[k] == pytest.approx(a[k], rel=1e-12, abs=1e-12), (k, a["round"])


@pytest.mark.mpi
def test_mpi_ranks_report_the_multiplex_client_metrics(tmp_path):
    """3 ranks over 9 clients: each rank scores its 3 clients, the [3, N] table is summed."""
    from tests.test_mpi import MPIEXEC, mpi4py, mpiexec

    if MPIEXEC is None or mpi4py is None:
        pytest.skip("needs mpiexec and mpi4py")
    bodies = {"server": {**small_scenario(data=HOLDOUT), "name": "server"},
              "natural": {**small_scenario(), "name": "natural"},  # test figures from the summed table
              "gossip": {**_gossip(data={**HOLDOUT, "partition": {"kind": "iid", "holdout": 0.3}}),
                         "name": "gossip"}}
    paths = [write_scenario(tmp_path, b, f"{k}.yaml") for k, b in bodies.items()]
    res = mpiexec(3, [sys.executable, "tests/mpi_scripts/run_many.py", str(tmp_path / "runs"), *paths])
    assert res.returncode == 0, res.stderr[-3000:]
    for name, body in bodies.items():
        ref = RoundLoop.from_setup(build_setup(parse_scenario(body))).run()
        (run,) = glob.glob(str(tmp_path / "runs" / f"{name}-[0-9]*"))
        got = read_metrics(run)
        assert len(got) == len(ref)
        for a, b in zip(ref, got, strict=True):
            for k in (*CLIENT_KEYS, "test_loss", "test_accuracy"):
                assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), (name, k, a["round"])


@pytest.mark.parametrize("body, covers", [(small_scenario(), True), (small_scenario(data=HOLDOUT), False),
                                          (small_scenario(data={"clients": 8, "partition": {"kind": "iid"}}),
                                           False)],
                         ids=["natural", "holdout", "iid"])
def test_server_test_figures_come_from_one_pass_when_client_splits_partition_the_test_set(
        body, covers, monkeypatch):
    """Natural splits: every test row is in one client's split, so test loss / accuracy are the
    per-client table's totals and the test set is not scored a second time; otherwise it is."""
    from fedsim.problem import DataProblem

    setup = build_setup(parse_scenario(body))
    prob = setup.problem()
    assert prob.client_test_covers is covers
    global_passes: list[int] = []
    real = DataProblem.evaluate
    monkeypatch.setattr(DataProblem, "evaluate", lambda self, x: global_passes.append(1) or real(self, x))
    loop = RoundLoop.from_setup(setup)
    lines = loop.run()
    monkeypatch.undo()
    assert len(global_passes) == (0 if covers else len(lines)) and len(lines) == 3
    x = loop.state.server[loop.strategy.model_key]
    loss, acc = prob.evaluate(x[None])
    assert lines[-1]["test_accuracy"] == float(acc[0])  # counts: exact either way
    assert lines[-1]["test_loss"] == pytest.approx(float(loss[0]), rel=1e-12)
    if covers:  # and they are the client table's totals
        assert lines[-1]["test_accuracy"] == lines[-1]["client_acc_weighted"]


def test_test_splits_partition_the_test_set_only_when_every_row_is_in_exactly_one():
    from fedsim.data.splits import ClientSplits

    train = [np.arange(3), np.arange(3, 5)]
    assert ClientSplits(train, [np.array([2, 0]), np.array([1, 3])]).partitions_test(4)
    assert not ClientSplits(train, [np.array([2, 0]), np.array([1])]).partitions_test(4)  # row 3 in none
    assert not ClientSplits(train, [np.array([2, 0, 1]), np.array([1, 3])]).partitions_test(4)  # row 1 twice
    holdout = ClientSplits(train, [np.array([0, 1]), np.array([2, 3])], "train")  # rows of x_train
    assert not holdout.partitions_test(4)
    assert not ClientSplits(train, None).partitions_test(4)
    assert not ClientSplits(train, [np.zeros(0, np.int64)] * 2).partitions_test(0)  # no test rows: no figures
