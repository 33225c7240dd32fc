"""`dataset: npz` with natural clients (`client_id`) and per-client test arrays; bad files."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data import client_splits, load_dataset
from fedsim.errors import ConfigError


def _arrays() -> dict[str, np.ndarray]:
    g = np.random.default_rng(0)
    ids = np.array([3, 1, 3, 2, 1, 3, 2, 1, 2, 3])  # clients 1, 2, 3 with 3, 3, 4 rows
    return dict(x_train=g.normal(size=(10, 4)).astype(np.float32), y_train=np.arange(10) % 3,
                x_test=g.normal(size=(5, 4)).astype(np.float32), y_test=np.array([0, 1, 2, 0, 1]),
                client_id=ids, client_id_test=np.array([2, 3, 3, 9, 2]))


def test_client_id_is_the_natural_split(tmp_path) -> None:
    a = _arrays()
    np.savez(tmp_path / "d.npz", **a)
    ds = load_dataset("npz", {"path": str(tmp_path / "d.npz")}, num_clients=3, seed=0)
    assert ds.client_names == ("1", "2", "3")
    for k, cid in enumerate((1, 2, 3)):
        rows = np.flatnonzero(a["client_id"] == cid)
        assert np.array_equal(ds.x_train[ds.natural_split[k]], a["x_train"][rows])
        assert np.array_equal(ds.y_train[ds.natural_split[k]], a["y_train"][rows])
        test_rows = np.flatnonzero(a["client_id_test"] == cid)
        assert np.array_equal(ds.client_test[k], test_rows)  # rows of x_test (client 9: none)
    assert np.array_equal(ds.x_test, a["x_test"])  # the global test set is all of x_test
    splits = client_splits("natural", {}, ds, num_clients=3, seed=0)
    assert splits.test_from == "test" and [len(t) for t in splits.test] == [0, 2, 2]


def test_test_fraction_without_test_arrays(tmp_path) -> None:
    a = _arrays()
    np.savez(tmp_path / "d.npz", x_train=a["x_train"], y_train=a["y_train"], client_id=a["client_id"])
    ds = load_dataset("npz", {"path": str(tmp_path / "d.npz"), "test_fraction": 0.34},
                      num_clients=3, seed=0)
    assert [len(p) for p in ds.natural_split] == [2, 2, 3]
    assert [len(t) for t in ds.client_test] == [1, 1, 1] and len(ds.y_test) == 3
    both = np.concatenate([ds.x_train, ds.x_test])
    assert sorted(map(bytes, both)) == sorted(map(bytes, a["x_train"]))  # each row once


def _write(path, case: str) -> dict:
    a = _arrays()
    if case == "missing_x":
        del a["x_train"]
    elif case == "missing_y_test":
        del a["y_test"]
    elif case == "length":
        a["y_train"] = a["y_train"][:9]
    elif case == "id_length":
        a["client_id"] = a["client_id"][:9]
    elif case == "float_labels":
        a["y_train"] = a["y_train"] + 0.5
    elif case == "string_labels":
        a["y_test"] = np.array(["a", "b", "c", "a", "b"])
    elif case == "negative":
        a["y_train"] = a["y_train"] - 1
    elif case == "2d_labels":
        a["y_train"] = np.stack([a["y_train"], a["y_train"]], 1)
    elif case == "float_ids":
        a["client_id"] = a["client_id"] + 0.5
    elif case == "unique_ids":
        a["client_id"] = np.arange(10)
    elif case == "shape":
        a["x_test"] = np.zeros((5, 3), np.float32)
    if case in ("garbage", "truncated"):
        np.savez(path, **a)
        data = path.read_bytes()
        path.write_bytes(b"not a zip file" if case == "garbage" else data[: len(data) // 2])
    elif case != "no_file":
        np.savez(path, **a)
    return a


@pytest.mark.parametrize("case,match,key", [
    ("no_file", "not found", "path"), ("garbage", "cannot read", None),
    ("truncated", "cannot read", None), ("missing_x", "missing array 'x_train'", "x_train"),
    ("missing_y_test", "missing array 'y_test'", "y_test"),
    ("length", "lengths differ", "x_train"), ("id_length", "lengths differ", "client_id"),
    ("float_labels", "fractional part", "y_train"), ("string_labels", "integer class ids", "y_test"),
    ("negative", "non-negative", "y_train"), ("2d_labels", "1-D", "y_train"),
    ("float_ids", "client ids must be", "client_id"), ("unique_ids", "per-sample id", "client_id"),
    ("shape", "feature shapes differ", "x_test")])
def test_npz_errors_name_the_npz_file(tmp_path, case: str, match: str, key: str | None) -> None:
    path = tmp_path / "d.npz"
    _write(path, case)
    with pytest.raises(ConfigError, match=match) as err:
        load_dataset("npz", {"path": str(path)}, num_clients=3, seed=0)
    # a missing file is the scenario's fault (its path value); any other error the file's
    assert err.value.file == (None if case == "no_file" else str(path)) and err.value.key == key


def test_too_many_clients_names_the_npz_file(tmp_path) -> None:
    a = _arrays()
    np.savez(tmp_path / "d.npz", x_train=a["x_train"], y_train=a["y_train"], x_test=a["x_test"],
             y_test=a["y_test"])
    ds = load_dataset("npz", {"path": str(tmp_path / "d.npz")}, num_clients=11, seed=0)
    with pytest.raises(ConfigError, match="at least one sample per client") as err:
        client_splits("iid", {}, ds, num_clients=11, seed=0)
    assert err.value.file == str(tmp_path / "d.npz") and err.value.allowed.startswith("at most 10")
    np.savez(tmp_path / "n.npz", **_arrays())
    nat = load_dataset("npz", {"path": str(tmp_path / "n.npz")}, num_clients=4, seed=0)
    with pytest.raises(ConfigError, match="has 3 natural clients"):
        client_splits("natural", {}, nat, num_clients=4, seed=0)


def test_npz_error_through_the_cli_names_the_npz_file(tmp_path, capsys) -> None:
    from fedsim.cli import main

    path = tmp_path / "d.npz"
    _write(path, "truncated")
    scen = tmp_path / "s.yaml"
    scen.write_text(f"data: {{dataset: npz, path: '{path}', clients: 3}}\nmodel: {{kind: logreg}}\n")
    assert main(["validate", str(scen)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and "cannot read .npz file" in err
