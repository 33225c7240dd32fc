"""`dataset: hf` on local copies in the hub's real formats, and Flower's partitioners.

Every dataset here is built locally (save_to_disk, parquet, CSV) and read through the same
code path as a hub id; offline mode is on for the whole module, so nothing can download.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before `datasets` is first imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fedsim.data import Dataset, load_dataset, partition  # noqa: E402
from fedsim.data.text import LEAF_CHARS  # noqa: E402
from fedsim.errors import ConfigError  # noqa: E402
from tests.fixtures import datasets as fx  # noqa: E402


@pytest.fixture(scope="module")
def femnist_dir(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("femnist") / "disk")
    fx.femnist_hf().save_to_disk(root)
    return root


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("cifar") / "disk")
    fx.cifar_hf().save_to_disk(root)
    return root


def _femnist(path: str, cache: str | None = None, **kw) -> Dataset:
    params = {"path": path, "client_column": "writer_id", "test_split": None,
              "test_fraction": 0.25, **kw}
    if cache:
        params["cache_dir"] = cache
    return load_dataset("hf", params, num_clients=6, seed=0)


def test_femnist_writers_are_natural_clients(femnist_dir: str) -> None:
    src = fx.femnist_hf()
    pix = np.stack([np.asarray(im) for im in src["image"]])
    ds = _femnist(femnist_dir)
    assert ds.x_train.dtype == np.uint8 and ds.feature_shape == (1, 28, 28)
    assert ds.num_classes == 62  # from the ClassLabel, although fewer classes occur
    assert ds.normalize is not None and ds.normalize.scale == pytest.approx(1 / 255)
    assert ds.client_names == tuple(sorted(set(src["writer_id"])))
    assert [len(p) for p in ds.natural_split] == [15] * 6  # 20 per writer, 5 held out
    assert [len(t) for t in ds.client_test] == [5] * 6 and len(ds.y_test) == 30
    writers = np.array(src["writer_id"])
    for k, name in enumerate(ds.client_names):
        mine = np.flatnonzero(writers == name)
        got = np.concatenate([ds.x_train[ds.natural_split[k]], ds.x_test[ds.client_test[k]]])
        want = pix[mine][:, None]
        # the writer's 20 images, split 15/5, exactly once each (compare as sorted bytes)
        assert sorted(map(bytes, got)) == sorted(map(bytes, want))
        labels = np.concatenate([ds.y_train[ds.natural_split[k]], ds.y_test[ds.client_test[k]]])
        assert sorted(labels.tolist()) == sorted(np.array(src["character"])[mine].tolist())
    assert np.allclose(ds.features(ds.x_train[:3]), ds.x_train[:3] / 255.0)


def test_parquet_equals_save_to_disk(femnist_dir: str, tmp_path) -> None:
    pq = fx.save_parquet(fx.femnist_hf(), str(tmp_path / "pq"))
    a = _femnist(femnist_dir)
    b = _femnist(pq, cache=str(tmp_path / "cache"))
    single = _femnist(os.path.join(pq, "data", "train-00000-of-00001.parquet"),
                      cache=str(tmp_path / "cache"))
    for other in (b, single):
        for f in ("x_train", "y_train", "x_test", "y_test"):
            assert np.array_equal(getattr(a, f), getattr(other, f)), f
        assert all(np.array_equal(p, q) for p, q in zip(a.natural_split, other.natural_split, strict=True))


def test_test_fraction_is_keyed_by_seed(femnist_dir: str) -> None:
    a, b = _femnist(femnist_dir), _femnist(femnist_dir)
    assert np.array_equal(a.x_test, b.x_test)
    c = load_dataset("hf", {"path": femnist_dir, "client_column": "writer_id", "test_split": None,
                            "test_fraction": 0.25}, num_clients=6, seed=1)
    assert not np.array_equal(a.y_test, c.y_test) or not np.array_equal(a.x_test, c.x_test)


def test_cifar_channels_first_and_normalisation(cifar_dir: str) -> None:
    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    ds = load_dataset("hf", {"path": cifar_dir, "mean": mean, "std": std}, num_clients=10, seed=0)
    src = fx.cifar_hf()
    img0 = np.asarray(src["train"][0]["img"])  # [32, 32, 3]
    assert ds.x_train.shape == (300, 3, 32, 32) and ds.x_test.shape == (100, 3, 32, 32)
    assert ds.natural_split is None and ds.num_classes == 10
    assert np.array_equal(ds.x_train[0], img0.transpose(2, 0, 1))
    assert np.array_equal(ds.y_test, np.array(src["test"]["label"]))
    f = ds.features(ds.x_train[:1])
    want = (img0.transpose(2, 0, 1) / 255.0 - np.array(mean)[:, None, None]) / \
        np.array(std)[:, None, None]
    assert f.dtype == np.float32 and np.allclose(f[0], want, atol=1e-5)
    gray = load_dataset("hf", {"path": cifar_dir, "image_mode": "L"}, num_clients=10, seed=0)
    assert gray.feature_shape == (1, 32, 32)


def test_shakespeare_csv_next_character(tmp_path) -> None:
    root = fx.shakespeare_csv(str(tmp_path / "shakespeare"), roles=4, per_role=10)
    ds = load_dataset("hf", {"path": root, "client_column": "character_id", "test_split": None,
                             "test_fraction": 0.2, "input": "x", "label": "y",
                             "cache_dir": str(tmp_path / "cache")}, num_clients=4, seed=0)
    assert ds.vocab == tuple(LEAF_CHARS) and ds.vocab_size == 80 and ds.num_classes == 80
    assert ds.x_train.dtype == np.int64 and ds.feature_shape == (80,)
    rows = {(r, x): y for r, x, y in fx.shakespeare_lines(roles=4, per_role=10)}
    for k, name in enumerate(ds.client_names):
        for i in ds.natural_split[k]:
            text = "".join(ds.vocab[j] for j in ds.x_train[i])
            assert rows[(name, text)] == ds.vocab[ds.y_train[i]]
    assert [len(p) for p in ds.natural_split] == [8] * 4 and [len(t) for t in ds.client_test] == [2] * 4
    data_vocab = load_dataset("hf", {"path": root, "client_column": "character_id",
                                     "test_split": None, "test_fraction": 0.2, "vocab": "data",
                                     "cache_dir": str(tmp_path / "cache")}, num_clients=4, seed=0)
    assert data_vocab.vocab_size < 80 and list(data_vocab.vocab) == sorted(data_vocab.vocab)


# ---- Flower Datasets' partitioners ------------------------------------------------------------

def test_flwr_natural_equals_natural(femnist_dir: str) -> None:
    ds = _femnist(femnist_dir)
    ours = partition("natural", {}, ds, num_clients=6, seed=0)
    flower = partition("flwr-natural", {}, ds, num_clients=6, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(ours, flower, strict=True))


@pytest.mark.parametrize("kind,params", [("flwr-iid", {}), ("flwr-dirichlet", {"alpha": 0.5}),
                                         ("flwr-pathological", {"num_classes_per_partition": 2})])
def test_flower_partitioners_cover_and_are_keyed(kind: str, params: dict) -> None:
    ds = load_dataset("digits", {}, num_clients=1, seed=0)
    parts = partition(kind, params, ds, num_clients=10, seed=0)
    flat = np.concatenate(parts)
    assert len(parts) == 10 and len(np.unique(flat)) == len(flat)
    if kind != "flwr-pathological":  # pathological may leave classes out by design
        assert np.array_equal(np.sort(flat), np.arange(len(ds.y_train)))
    again = partition(kind, params, ds, num_clients=10, seed=0)
    other = partition(kind, params, ds, num_clients=10, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    if kind == "flwr-iid":
        assert {len(p) for p in parts} <= {143, 144}
        # shuffled before sharding: every client sees most labels
        assert min(len(np.unique(ds.y_train[p])) for p in parts) >= 8
    if kind == "flwr-pathological":
        assert max(len(np.unique(ds.y_train[p])) for p in parts) <= 2


def test_flower_dirichlet_failure_is_a_config_error() -> None:
    ds = load_dataset("digits", {}, num_clients=1, seed=0)
    with pytest.raises(ConfigError, match="Flower partitioner failed"):
        partition("flwr-dirichlet", {"alpha": 0.01, "min_partition_size": 140}, ds,
                  num_clients=10, seed=0)


# ---- bad input: each exits 2 naming file, key, value and what is allowed ----------------------

def test_missing_column(femnist_dir: str) -> None:
    for key in ("input", "label", "client_column"):
        with pytest.raises(ConfigError, match="column not found") as err:
            _femnist(femnist_dir, **{key: "nope"})
        e = err.value
        assert e.file == femnist_dir and e.key == key and e.value == "nope"
        assert "writer_id" in e.allowed and "image" in e.allowed


def test_float_label_column(tmp_path) -> None:
    import datasets

    d = datasets.Dataset.from_dict({"x": [[0.0, 1.0]] * 4, "target": [0.5, 1.5, 2.0, 0.1]})
    d.save_to_disk(str(tmp_path / "f"))
    with pytest.raises(ConfigError, match="label column holds floats") as err:
        load_dataset("hf", {"path": str(tmp_path / "f"), "label": "target", "test_split": None,
                            "test_fraction": 0.5}, num_clients=1, seed=0)
    assert err.value.key == "label" and "float" in str(err.value.value)


def test_images_of_mixed_shapes(tmp_path) -> None:
    import datasets
    from PIL import Image

    ims = [Image.fromarray(np.zeros((28, 28 if i < 3 else 27), np.uint8)) for i in range(5)]
    d = datasets.Dataset.from_dict({"image": ims, "label": [0, 1, 0, 1, 0]},
                                   features=datasets.Features({"image": datasets.Image(),
                                                               "label": datasets.Value("int64")}))
    d.save_to_disk(str(tmp_path / "m"))
    with pytest.raises(ConfigError, match="mixed shapes") as err:
        load_dataset("hf", {"path": str(tmp_path / "m"), "test_split": None, "test_fraction": 0.4},
                     num_clients=1, seed=0)
    assert err.value.key == "input" and "(28, 28)" in err.value.value and "(28, 27)" in err.value.value


def test_client_column_with_one_sample_per_client(femnist_dir: str, tmp_path) -> None:
    src = fx.femnist_hf().add_column("row_id", [f"r{i}" for i in range(120)])
    src.save_to_disk(str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="per-sample id") as err:
        _femnist(str(tmp_path / "r"), client_column="row_id")
    assert err.value.key == "client_column"
    assert err.value.value == "row_id: 120 distinct ids in 120 rows"


def test_bad_split_and_mean(cifar_dir: str) -> None:
    with pytest.raises(ConfigError, match="split not found") as err:
        load_dataset("hf", {"path": cifar_dir, "test_split": "validation"}, num_clients=1, seed=0)
    assert err.value.key == "test_split" and "test" in err.value.allowed
    with pytest.raises(ConfigError, match="one value per channel") as err:
        load_dataset("hf", {"path": cifar_dir, "mean": [0.5, 0.5]}, num_clients=1, seed=0)
    assert err.value.key == "mean"
    with pytest.raises(ConfigError, match="no test split") as err:
        load_dataset("hf", {"path": cifar_dir, "test_split": None}, num_clients=1, seed=0)
    assert err.value.key == "test_fraction"
    with pytest.raises(ConfigError, match="data path not found"):
        load_dataset("hf", {"path": "./no/such/dir"}, num_clients=1, seed=0)


def test_missing_hub_dataset_offline_exits_2(tmp_path) -> None:
    scen = tmp_path / "s.yaml"
    scen.write_text("data: {dataset: hf, path: uoft-cs/cifar10, clients: 2}\nmodel: {kind: logreg}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home")}
    env.pop("HF_DATASETS_CACHE", None)
    res = subprocess.run([sys.executable, "-m", "fedsim", "validate", str(scen)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    msg = res.stderr.strip()
    # the scenario names a dataset that cannot be loaded: its file, key and value
    assert msg.startswith(f"error: {scen}: data.path: dataset is not in the Hugging Face cache")
    assert "offline mode is on" in msg and "(got 'uoft-cs/cifar10')" in msg
    assert "datasets.load_dataset('uoft-cs/cifar10')" in msg and "Traceback" not in msg
