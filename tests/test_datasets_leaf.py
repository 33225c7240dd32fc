"""`dataset: leaf` on LEAF JSON files written as LEAF's preprocessing writes them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fedsim.data import load_dataset, partition
from fedsim.data.text import LEAF_CHARS
from fedsim.errors import ConfigError
from tests.fixtures import datasets as fx


def test_femnist_directory_of_files(tmp_path) -> None:
    root = fx.leaf_femnist(str(tmp_path / "femnist"), writers=5, per_writer=10, files=2)
    ds = load_dataset("leaf", {"path": root, "input_shape": [1, 28, 28]}, num_clients=5, seed=0)
    assert ds.client_names == tuple(f"f{w:04d}_00" for w in range(5))  # from both files
    assert ds.x_train.dtype == np.uint8 and ds.feature_shape == (1, 28, 28)
    assert ds.normalize is not None and ds.num_classes <= 62
    assert [len(p) for p in ds.natural_split] == [8] * 5 and [len(t) for t in ds.client_test] == [2] * 5
    # the pixels are LEAF's floats k/255, stored exactly as k
    doc = json.load(open(os.path.join(root, "train", "all_data_1_niid_0_keep_0_train_9.json")))
    x1 = np.array(doc["user_data"]["f0001_00"]["x"])
    k = ds.client_names.index("f0001_00")
    assert np.allclose(ds.features(ds.x_train[ds.natural_split[k]]).reshape(-1, 784), x1, atol=1e-6)
    assert ds.y_train[ds.natural_split[k]].tolist() == doc["user_data"]["f0001_00"]["y"]
    test_doc = json.load(open(os.path.join(root, "test", "all_data_1_niid_0_keep_0_test_9.json")))
    assert ds.y_test[ds.client_test[k]].tolist() == test_doc["user_data"]["f0001_00"]["y"]
    parts = partition("natural", {}, ds, num_clients=5, seed=0)
    assert all(np.array_equal(p, q) for p, q in zip(parts, ds.natural_split, strict=True))


def test_single_file_and_explicit_test_path(tmp_path) -> None:
    root = fx.leaf_femnist(str(tmp_path / "f"), writers=2, per_writer=5, files=1)
    train = os.path.join(root, "train", "all_data_0_niid_0_keep_0_train_9.json")
    test = os.path.join(root, "test")
    a = load_dataset("leaf", {"path": train, "test_path": test}, num_clients=2, seed=0)
    b = load_dataset("leaf", {"path": root}, num_clients=2, seed=0)
    assert a.feature_shape == (784,)
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    c = load_dataset("leaf", {"path": train, "test_fraction": 0.25}, num_clients=2, seed=0)
    assert [len(p) + len(t) for p, t in zip(c.natural_split, c.client_test, strict=True)] == [4, 4]


def test_shakespeare_next_character(tmp_path) -> None:
    lines = fx.shakespeare_lines(roles=3, per_role=6)
    users = {}
    for role, x, y in lines:
        users.setdefault(role, ([], []))
        users[role][0].append(x)
        users[role][1].append(y)
    path = fx.leaf_json(str(tmp_path / "shakespeare" / "train" / "all_data_niid_0.json"), users)
    ds = load_dataset("leaf", {"path": path, "test_fraction": 0.34}, num_clients=3, seed=0)
    assert ds.vocab == tuple(LEAF_CHARS) and ds.num_classes == 80
    assert ds.x_train.dtype == np.int64 and ds.feature_shape == (80,)
    for k, role in enumerate(ds.client_names):
        for i in ds.natural_split[k]:
            text = "".join(LEAF_CHARS[j] for j in ds.x_train[i])
            assert text in users[role][0]
            assert LEAF_CHARS[ds.y_train[i]] == users[role][1][users[role][0].index(text)]


def test_sent140_words(tmp_path) -> None:
    tweets = {"alice": (["I love this movie !", "great day , love it", "so bad"], [1, 1, 0]),
              "bob": (["bad bad day", "love love love", "meh"], [0, 1, 0])}
    raw = {u: ([["id", "date", "NO_QUERY", u, t] for t in xs], ys) for u, (xs, ys) in tweets.items()}
    path = fx.leaf_json(str(tmp_path / "sent140.json"), raw)
    ds = load_dataset("leaf", {"path": path, "test_fraction": 0.34, "tokens": "words",
                               "seq_len": 4, "vocab_size": 3}, num_clients=2, seed=0)
    # vocabulary: pad, unk, then the 3 most frequent training tokens
    assert ds.vocab[:2] == ("<pad>", "<unk>") and len(ds.vocab) == 5
    assert ds.num_classes == 2 and ds.x_train.shape[1] == 4 and ds.x_train.dtype == np.int64
    assert "love" in ds.vocab


@pytest.mark.parametrize("case,match,key", [
    ("num_samples", "does not match its data", "num_samples[1]"),
    ("no_users", "not a LEAF JSON file", "users"),
    ("no_user_data", "user has no x/y data", "user_data.u1"),
    ("lengths", "different lengths", "num_samples"),
    ("mixed", "mixed shapes", "x"),
    ("float_y", "fractional part", "y"),
    ("broken", "cannot read LEAF JSON", None)])
def test_leaf_errors(tmp_path, case: str, match: str, key: str | None) -> None:
    doc = {"users": ["u0", "u1"], "num_samples": [2, 2],
           "user_data": {"u0": {"x": [[0.1, 0.2], [0.3, 0.4]], "y": [0, 1]},
                         "u1": {"x": [[0.5, 0.6], [0.7, 0.8]], "y": [1, 0]}}}
    if case == "num_samples":
        doc["num_samples"] = [2, 3]
    elif case == "no_users":
        del doc["users"]
    elif case == "no_user_data":
        del doc["user_data"]["u1"]
    elif case == "lengths":
        doc["num_samples"] = [2]
    elif case == "mixed":
        doc["user_data"]["u1"]["x"][1] = [0.7]
    elif case == "float_y":
        doc["user_data"]["u1"]["y"] = [0.5, 1.0]
    path = tmp_path / "train.json"
    path.write_text("{not json" if case == "broken" else json.dumps(doc))
    with pytest.raises(ConfigError, match=match) as err:
        load_dataset("leaf", {"path": str(path), "test_fraction": 0.5}, num_clients=2, seed=0)
    assert err.value.file == str(path) and err.value.key == key
    if case == "num_samples":
        assert err.value.value == 3 and err.value.allowed.startswith("2 ")


def test_leaf_missing_path(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found") as err:
        load_dataset("leaf", {"path": str(tmp_path / "nope")}, num_clients=1, seed=0)
    assert err.value.key == "path"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .json files"):
        load_dataset("leaf", {"path": str(tmp_path / "empty")}, num_clients=1, seed=0)
    root = fx.leaf_femnist(str(tmp_path / "f"), writers=2, per_writer=5, files=1)
    with pytest.raises(ConfigError, match="input_shape") as err:
        load_dataset("leaf", {"path": root, "input_shape": [1, 27, 28]}, num_clients=2, seed=0)
    assert err.value.key == "input_shape"
