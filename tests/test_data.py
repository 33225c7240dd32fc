"""Datasets and partitions: shapes, coverage, label skew, determinism, npz errors."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data import DATASETS, PARTITIONS, Dataset, label_distribution, load_dataset, partition
from fedsim.errors import ConfigError


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", {}, num_clients=10, seed=0)


def _tv_from_global(ds: Dataset, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance of client label distributions from the global one."""
    q = label_distribution(ds.y_train, parts, ds.num_classes)
    glob = np.bincount(ds.y_train, minlength=ds.num_classes) / len(ds.y_train)
    return float(0.5 * np.abs(q - glob).sum(1).mean())


def test_registered_names() -> None:
    assert {"synthetic", "logistic", "digits", "npz"} <= set(DATASETS.names())
    assert {"iid", "dirichlet", "shards", "natural"} <= set(PARTITIONS.names())
    assert DATASETS.describe("digits")


def test_digits_is_real(digits: Dataset) -> None:
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert len(digits.y_test) == round(1797 * 0.2)
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int64
    assert digits.feature_shape == (64,) and digits.num_classes == 10
    assert 0 <= digits.x_train.min() and digits.x_train.max() <= 1
    img = load_dataset("digits", {"flatten": False}, num_clients=1, seed=0)
    assert img.feature_shape == (1, 8, 8)


@pytest.mark.parametrize("name", ["synthetic", "logistic"])
def test_generators_natural_split(name: str) -> None:
    ds = load_dataset(name, {"samples_per_client": 50}, num_clients=7, seed=3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert [len(p) for p in ds.natural_split] == [40] * 7
    assert len(ds.y_test) == 7 * 10
    parts = partition("natural", {}, ds, num_clients=7, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(ds.y_train)))
    assert ds.y_train.max() < ds.num_classes
    if name == "logistic":
        assert ds.num_classes == 2 and set(np.unique(ds.y_train)) == {0, 1}


def test_synthetic_10000_clients_and_size_skew() -> None:
    ds = load_dataset("synthetic", {}, num_clients=10_000, seed=1)
    assert ds.x_train.shape == (10_000 * 160, 60) and len(ds.y_test) == 10_000 * 40
    assert len(ds.natural_split) == 10_000 and all(len(p) == 160 for p in ds.natural_split[:50])
    assert len(np.unique(ds.y_train)) == 10
    skew = load_dataset("synthetic", {"size_skew": 1.0, "dim": 5}, num_clients=200, seed=1)
    sizes = np.array([len(p) for p in skew.natural_split])
    assert sizes.min() >= 1 and sizes.max() > 3 * sizes.min()


def test_dataset_determinism() -> None:
    a = load_dataset("synthetic", {"dim": 8}, num_clients=5, seed=0)
    b = load_dataset("synthetic", {"dim": 8}, num_clients=5, seed=0)
    c = load_dataset("synthetic", {"dim": 8}, num_clients=5, seed=1)
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.x_train, c.x_train)
    # client k's data do not depend on the number of clients
    d = load_dataset("synthetic", {"dim": 8}, num_clients=9, seed=0)
    assert np.array_equal(a.x_train[a.natural_split[4]], d.x_train[d.natural_split[4]])


@pytest.mark.parametrize("kind,params", [("iid", {}), ("iid", {"size_skew": 1.0}),
                                         ("dirichlet", {"alpha": 0.3}),
                                         ("dirichlet", {"alpha": 0.3, "scheme": "per_client"}),
                                         ("dirichlet", {"alpha": 1.0, "size_skew": 1.0}),
                                         ("shards", {"classes_per_client": 2})])
def test_every_sample_exactly_once(digits: Dataset, kind: str, params: dict) -> None:
    parts = partition(kind, params, digits, num_clients=20, seed=0)
    assert len(parts) == 20 and min(len(p) for p in parts) >= 1
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(digits.y_train)))
    again = partition(kind, params, digits, num_clients=20, seed=0)
    other = partition(kind, params, digits, num_clients=20, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


@pytest.mark.parametrize("scheme", ["per_class", "per_client"])
def test_dirichlet_skew_grows_as_alpha_shrinks(digits: Dataset, scheme: str) -> None:
    tv = [_tv_from_global(digits, partition("dirichlet", {"alpha": a, "scheme": scheme}, digits,
                                            num_clients=20, seed=0)) for a in (100, 1, 0.05)]
    assert tv[0] < 0.1 < tv[1] < tv[2] and tv[2] > 0.6
    iid = _tv_from_global(digits, partition("iid", {}, digits, num_clients=20, seed=0))
    assert iid < 0.15


def test_dirichlet_min_size_and_failure(digits: Dataset) -> None:
    parts = partition("dirichlet", {"alpha": 0.1, "min_size": 10}, digits, num_clients=20, seed=0)
    assert min(len(p) for p in parts) >= 10
    with pytest.raises(ConfigError, match="min_size"):
        partition("dirichlet", {"alpha": 0.05, "min_size": 70, "max_tries": 5}, digits,
                  num_clients=20, seed=0)


def test_shards_labels_per_client(digits: Dataset) -> None:
    for k in (1, 2, 3):
        parts = partition("shards", {"classes_per_client": k}, digits, num_clients=30, seed=0)
        assert max(len(np.unique(digits.y_train[p])) for p in parts) <= k
        assert sum(len(p) for p in parts) == len(digits.y_train)


def test_size_skew_keeps_total(digits: Dataset) -> None:
    for kind, extra in (("iid", {}), ("dirichlet", {"alpha": 10.0})):
        flat = partition(kind, extra, digits, num_clients=20, seed=0)
        skew = partition(kind, {**extra, "size_skew": 1.5}, digits, num_clients=20, seed=0)
        assert sum(map(len, skew)) == sum(map(len, flat)) == len(digits.y_train)
        assert max(map(len, skew)) > 2 * max(map(len, flat))
    assert {len(p) for p in partition("iid", {}, digits, num_clients=20, seed=0)} <= {71, 72}


def test_partition_errors(digits: Dataset) -> None:
    with pytest.raises(ConfigError, match="natural split"):
        partition("natural", {}, digits, num_clients=3, seed=0)
    with pytest.raises(ConfigError, match="at least one sample per client"):
        partition("iid", {}, digits, num_clients=len(digits.y_train) + 1, seed=0)
    with pytest.raises(ConfigError, match="alpha"):
        partition("dirichlet", {"alpha": 0}, digits, num_clients=3, seed=0)
    with pytest.raises(ConfigError, match="unknown key"):
        partition("iid", {"alpha": 1}, digits, num_clients=3, seed=0)


def test_label_distribution() -> None:
    y = np.array([0, 1, 1, 2, 2, 2])
    q = label_distribution(y, [np.array([0, 1]), np.array([2, 3, 4, 5])], 3)
    assert np.allclose(q, [[0.5, 0.5, 0], [0, 0.25, 0.75]])


# ---- npz -------------------------------------------------------------------------------------

def _save(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def test_npz_round_trip(tmp_path) -> None:
    g = np.random.default_rng(0)
    xs = g.integers(0, 256, (30, 1, 4, 4), dtype=np.uint8)
    path = _save(tmp_path / "d.npz", x_train=xs[:20], y_train=np.arange(20) % 3,
                 x_test=xs[20:], y_test=np.arange(10.0) % 3)
    ds = load_dataset("npz", {"path": path}, num_clients=2, seed=0)
    assert ds.feature_shape == (1, 4, 4) and ds.num_classes == 3
    # uint8 pixels stay uint8 (4x smaller); the device sees them scaled to [0, 1]
    assert ds.x_train.dtype == np.uint8 and np.array_equal(ds.x_train, xs[:20])
    assert ds.features(ds.x_train).dtype == np.float32
    assert np.allclose(ds.features(ds.x_train), xs[:20] / 255)
    assert ds.y_test.dtype == np.int64 and ds.y_test.tolist() == [0, 1, 2] * 3 + [0]
    five = load_dataset("npz", {"path": path, "num_classes": 5}, num_clients=2, seed=0)
    assert five.num_classes == 5


def test_normalize_numpy_and_torch_agree() -> None:
    import torch

    from fedsim.data import Normalize

    x = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2) * 10
    norm = Normalize(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    want = (x / 255.0 - np.array([0.1, 0.2, 0.3])[:, None, None]) / np.array([0.5, 0.25, 2.0])[:, None, None]
    assert np.allclose(norm.apply(x), want, atol=1e-6)
    got = norm.apply_torch(torch.as_tensor(x), torch.float64)
    assert got.dtype == torch.float64 and np.allclose(got.numpy(), want)
    flat = Normalize(mean=(0.5,), std=(0.5,)).apply(np.array([[0, 255]], np.uint8))
    assert np.allclose(flat, [[-1.0, 1.0]])
