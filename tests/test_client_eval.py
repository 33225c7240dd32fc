"""Per-client test splits and metrics: hand-computed summaries, stacked == per-client loop."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedsim.client_metrics import client_metrics, quantile_sorted
from fedsim.config import parse_scenario
from fedsim.data import client_splits, load_dataset
from fedsim.setup import build_setup
from tests.conftest import small_scenario


def test_client_metrics_by_hand() -> None:
    # accuracies of the clients with test data: 3/4, 1/2, 8/10 (client 2 has none)
    m = client_metrics([3, 1, 0, 8], [4, 2, 0, 10], loss_sum=[1.0, 2.0, 5.0, 3.0])
    acc = np.array([0.75, 0.5, 0.8])
    assert m["client_acc_mean"] == pytest.approx(acc.mean())
    assert m["client_acc_weighted"] == pytest.approx(12 / 16)
    assert m["client_acc_worst10"] == pytest.approx(0.5)  # ceil(3 / 10) = 1 client
    assert m["client_acc_std"] == pytest.approx(math.sqrt(((acc - acc.mean()) ** 2).mean()))
    assert m["client_loss"] == pytest.approx(6.0 / 16) and m["clients_evaluated"] == 3
    # 20 clients: the worst 10% are the 2 lowest; torch inputs work the same
    correct = torch.arange(20, dtype=torch.float64)
    m20 = client_metrics(correct, torch.full((20,), 20.0))
    assert m20["client_acc_worst10"] == pytest.approx((0 + 1) / 2 / 20)
    assert m20["client_acc_mean"] == pytest.approx(9.5 / 20) == m20["client_acc_weighted"]
    assert client_metrics([0, 0], [0, 0]) == {}


def test_percentiles_are_numpys_linear_quantiles_bit_for_bit() -> None:
    # by hand: 5 sorted values, (K-1) q = 0.4 / 2 / 3.6 -> 0 + 0.4 (1 - 0), 2, 3 + 0.6 (7 - 3)
    ranked = np.array([0.0, 1.0, 2.0, 3.0, 7.0])
    assert [quantile_sorted(ranked, q) for q in (0.1, 0.5, 0.9)] == pytest.approx([0.4, 2.0, 5.4])
    assert quantile_sorted(np.array([0.25]), 0.9) == 0.25
    rng = np.random.default_rng(0)
    for k in [*range(1, 40), 999, 1000, 1001]:
        for acc in (rng.random(k), rng.integers(0, 5, k) / 4):  # ties, as accuracies of small splits have
            ranked = np.sort(acc)
            for q in (0.1, 0.5, 0.9):
                assert quantile_sorted(ranked, q) == float(np.quantile(acc, q)), (k, q)
    m = client_metrics(rng.integers(0, 20, 57), np.full(57, 20))
    acc = np.sort(np.asarray([m["client_acc_p10"], m["client_acc_median"], m["client_acc_p90"]]))
    assert list(acc) == [m["client_acc_p10"], m["client_acc_median"], m["client_acc_p90"]]


def test_client_metrics_does_not_import_numpy_ma() -> None:
    # np.quantile's first call imports numpy.ma (~40 ms inside the first metrics line's wall time)
    code = ("import sys; from fedsim.client_metrics import client_metrics; "
            "client_metrics([1, 2, 3], [4, 4, 4]); print('numpy.ma' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _setup(**over):
    sc = parse_scenario(small_scenario(**over))
    return build_setup(sc)


def _loop(problem, x: torch.Tensor, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Reference: one client at a time, one model at a time."""
    ct = problem.client_test
    loss, correct = [], []
    for j, i in enumerate(ids):
        o, n = int(ct.offsets[i]), int(ct.sizes[i])
        logits = problem.model.forward(x[j:j + 1], ct.x[o:o + n][None])[0]
        loss.append(float(F.cross_entropy(logits, ct.y[o:o + n], reduction="sum")))
        correct.append(int((logits.argmax(-1) == ct.y[o:o + n]).sum()))
    return np.array(loss), np.array(correct)


@pytest.mark.parametrize("eval_batch", [2048, 3])
def test_evaluate_clients_equals_per_client_loop(eval_batch: int) -> None:
    s = _setup(data={"dataset": "synthetic", "clients": 8, "samples_per_client": 40,
                     "size_skew": 1.0, "partition": {"kind": "natural"}})
    prob = s.problem()
    prob.eval_batch = eval_batch
    assert prob.client_test is not None
    sizes = prob.client_test.sizes.tolist()
    assert sizes == [len(t) for t in s.dataset.client_test] and len(set(sizes)) > 1
    ids = [5, 0, 7, 2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(ids), s.model.spec.size, generator=g, dtype=torch.float64)
    loss, correct, count = prob.evaluate_clients(x, torch.tensor(ids))
    ref_loss, ref_correct = _loop(prob, x, ids)
    assert np.allclose(loss.numpy(), ref_loss, rtol=1e-10)
    assert np.array_equal(correct.numpy(), ref_correct)
    assert count.tolist() == [sizes[i] for i in ids]
    # an MPI rank holding clients 2 and 5 only scores them the same
    part = prob.restrict(np.array([2, 5]))
    l2, c2, _ = part.evaluate_clients(x[[3, 0]], torch.tensor([2, 5]))
    assert np.allclose(l2.numpy(), ref_loss[[3, 0]]) and np.array_equal(c2.numpy(), ref_correct[[3, 0]])


@pytest.mark.parametrize("eval_batch", [2048, 7])
def test_one_model_for_every_client_equals_per_client_loop(eval_batch: int) -> None:
    """A server model expanded over the clients (stride 0) takes the shared-forward path: the
    same per-client sums as scoring it client by client, in any order of ids, across batch
    boundaries, on a restricted (MPI-rank) problem, and for a client with no test rows."""
    s = _setup(data={"dataset": "synthetic", "clients": 8, "samples_per_client": 40,
                     "size_skew": 1.0, "partition": {"kind": "natural"}})
    prob = s.problem()
    prob.eval_batch = eval_batch
    ids = [5, 0, 7, 2, 3]
    g = torch.Generator().manual_seed(1)
    server = torch.randn(s.model.spec.size, generator=g, dtype=torch.float64)
    x = server.expand(len(ids), -1)
    assert x.stride(0) == 0
    loss, correct, count = prob.evaluate_clients(x, torch.tensor(ids))
    ref_loss, ref_correct = _loop(prob, server.repeat(len(ids), 1), ids)
    assert np.allclose(loss.numpy(), ref_loss, rtol=1e-10)
    assert np.array_equal(correct.numpy(), ref_correct)
    assert count.tolist() == [int(prob.client_test.sizes[i]) for i in ids]
    part = prob.restrict(np.array([2, 5]))  # other clients' splits are empty there
    l2, c2, n2 = part.evaluate_clients(server.expand(3, -1), torch.tensor([2, 4, 5]))
    assert n2.tolist()[1] == 0 and l2[1] == 0 and c2[1] == 0
    assert np.allclose(l2.numpy()[[0, 2]], ref_loss[[3, 0]]) and np.array_equal(c2.numpy()[[0, 2]],
                                                                                ref_correct[[3, 0]])


def test_holdout_gives_each_client_its_own_test_split() -> None:
    s = _setup(data={"dataset": "digits", "clients": 10, "partition": {"kind": "dirichlet",
                                                                        "alpha": 0.5, "holdout": 0.2}})
    full = client_splits("dirichlet", {"alpha": 0.5}, s.dataset, num_clients=10, seed=3)
    assert s.splits.test_from == "train"
    for k in range(10):
        tr, te = s.splits.train[k], s.splits.test[k]
        assert len(te) == min(round(0.2 * len(full.train[k])), len(full.train[k]) - 1)
        assert np.array_equal(np.sort(np.concatenate([tr, te])), full.train[k])
        assert len(np.intersect1d(tr, te)) == 0
    assert np.array_equal(s.sizes, [len(t) for t in s.splits.train])
    prob = s.problem()
    assert prob.client_test.sizes.tolist() == [len(t) for t in s.splits.test]
    k = 4
    o = int(prob.client_test.offsets[k])
    rows = s.splits.test[k]
    assert torch.equal(prob.client_test.y[o:o + len(rows)], torch.as_tensor(s.dataset.y_train[rows]))


def test_natural_subset_keeps_its_clients_test_data() -> None:
    ds = load_dataset("synthetic", {"samples_per_client": 20, "dim": 5}, num_clients=12, seed=0)
    sp = client_splits("natural", {"select": "random"}, ds, num_clients=5, seed=0)
    owner = {int(p[0]): k for k, p in enumerate(ds.natural_split)}
    chosen = [owner[int(p[0])] for p in sp.train]
    assert chosen == sorted(chosen) and len(set(chosen)) == 5 and chosen != list(range(5))
    assert all(np.array_equal(t, ds.client_test[k]) for t, k in zip(sp.test, chosen, strict=True))
    first = client_splits("natural", {"select": "first"}, ds, num_clients=5, seed=0)
    assert all(np.array_equal(t, ds.client_test[k]) for k, t in enumerate(first.test))
    # clients that are not whole natural clients have no test split of their own
    assert client_splits("iid", {}, ds, num_clients=5, seed=0).test is None


def test_global_test_set_stays() -> None:
    s = _setup()
    prob = s.problem()
    loss, acc = prob.evaluate(s.x0[None])
    assert prob.x_test.shape[0] == len(s.dataset.y_test) == sum(len(t) for t in s.dataset.client_test)
    # the union of the clients' own test splits is the global test set: the sample-weighted
    # client accuracy of one shared model equals its global test accuracy
    ids = torch.arange(s.num_clients)
    _, correct, count = prob.evaluate_clients(s.x0.expand(s.num_clients, -1), ids)
    assert client_metrics(correct, count)["client_acc_weighted"] == pytest.approx(float(acc[0]))


def test_holdout_and_select_errors() -> None:
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match="holdout") as err:
        parse_scenario(small_scenario(data={"dataset": "digits", "clients": 4,
                                            "partition": {"kind": "iid", "holdout": 1.0}}))
    assert err.value.key == "data.partition.holdout" and err.value.value == 1.0
    ds = load_dataset("synthetic", {"samples_per_client": 10, "dim": 3}, num_clients=4, seed=0)
    with pytest.raises(ConfigError, match="has 4 natural clients") as err:
        client_splits("natural", {"select": "random"}, ds, num_clients=5, seed=0)
    assert "select" in err.value.allowed
