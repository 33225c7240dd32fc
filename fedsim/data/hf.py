"""``dataset: hf``: Hugging Face datasets (the data layer of Flower Datasets), read once at set-up.

`path` is a hub id (``uoft-cs/cifar10``, ``flwrlabs/femnist``, ``flwrlabs/shakespeare``),
a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, a directory of
parquet (csv, json) files whose names give the splits (``train-*.parquet``), or one parquet
file. Hub data goes through the Hugging Face cache (``HF_HOME``, `cache_dir`); with
``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` only cached data is used, and a dataset that
is not there is a ConfigError (exit 2) saying how to fetch it. Images are decoded once into a
uint8 array [n, C, H, W] (normalised on the device, `Dataset.normalize`); text becomes token
ids (`fedsim.data.text`). Needs the ``[hf]`` extra: ``pip install -e ".[hf]"``.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from fedsim.data import DATASETS, Dataset, Normalize
from fedsim.data.arrays import assemble, channels_first, int_labels
from fedsim.data.text import CharVocab, Tokens, encode_text, next_char_labels
from fedsim.errors import ConfigError

PosInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
_BATCH = 4096
_INPUT_NAMES = ("image", "img", "pixels", "x", "text", "sentence")
_LABEL_NAMES = ("label", "labels", "y", "character", "fine_label")


@DATASETS.register("hf")
def hf(*, path: str, subset: str | None = None, revision: str | None = None,
       cache_dir: str | None = None, train_split: str = "train", test_split: str | None = "test",
       test_fraction: Fraction = 0.0, input: str | None = None, label: str | None = None,
       client_column: str | None = None, image_mode: Literal["keep", "L", "RGB"] = "keep",
       mean: list[float] | None = None, std: list[float] | None = None,
       num_classes: PosInt | None = None, tokens: Tokens = "chars", vocab: CharVocab = "leaf",
       seq_len: PosInt = 25, vocab_size: PosInt = 10000, num_clients: int,
       seed: int) -> Dataset:
    """Hugging Face / Flower Datasets: hub id, save_to_disk directory or parquet files.

    Columns: `input` (default: the Image column, else image/img/x/text), `label` (default:
    the ClassLabel column, else label/y) and optionally `client_column`, the natural client
    id (FEMNIST ``writer_id``, Shakespeare ``character_id``) for ``partition: natural``.
    Splits `train_split` and `test_split`; without a test split (``test_split: null`` or a
    dataset that has none) `test_fraction` of every client's rows (of all rows without a
    client column) is held out as the test set and as each client's own test data. Images:
    `image_mode` converts colour modes; `mean`/`std` per channel apply after scaling to [0, 1].
    Text: `tokens` chars (`vocab`: LEAF's 80 characters or the data's) with single-character
    labels for next-character prediction, or words (`vocab_size`, `seq_len`).
    """
    splits = _open(path, subset, revision, cache_dir)
    train = _split(splits, train_split, "train_split", path)
    test = None
    if test_split is not None and (test_split in splits or test_fraction == 0):
        test = _split(splits, test_split, "test_split", path)
    cols = _columns(train, input, label, client_column, path)
    train, test = (_convert_mode(d, cols[0], image_mode) for d in (train, test))
    x, y, ids = _read(train, cols, path)
    x_te, y_te, ids_te = _read(test, cols, path) if test is not None else (None, None, None)
    next_char = x.dtype.kind in "US" and y.dtype.kind in "US"
    classes = num_classes or (None if next_char else _class_count(train, cols[1]))
    if x.dtype.kind in "US":
        x, y, x_te, y_te, extra = _text(x, y, x_te, y_te, path, tokens=tokens, vocab=vocab,
                                        seq_len=seq_len, vocab_size=vocab_size)
    else:
        extra = {"normalize": _normalize(x, mean, std, path)}
    if next_char:  # one class per vocabulary entry, whether or not it occurs as a label
        classes = num_classes or len(extra["vocab"])
    y = int_labels(y, file=path, key="label")
    test_arrays = None if x_te is None else (x_te, int_labels(y_te, file=path, key="label"), ids_te)
    return assemble("hf", x, y, ids=ids, test=test_arrays, test_fraction=test_fraction,
                    seed=seed, file=path, id_key="client_column", id_column=client_column,
                    num_classes=classes, **extra)


def _text(x: np.ndarray, y: np.ndarray, x_te: np.ndarray | None, y_te: np.ndarray | None,
          path: str, **how: Any) -> tuple[Any, ...]:
    """String inputs as token ids; single-character string labels as next-character ids."""
    chars = y.dtype.kind in "US"
    labels = [*y.tolist(), *([] if y_te is None else y_te.tolist())] if chars else ()
    a, b, v = encode_text(x.tolist(), [] if x_te is None else x_te.tolist(), file=path,
                          key="input", labels=labels, **how)
    if chars:
        y = next_char_labels(y.tolist(), v, file=path, key="label")
        y_te = None if y_te is None else next_char_labels(y_te.tolist(), v, file=path, key="label")
    return a, y, (None if x_te is None else b), y_te, {"vocab": v}


def _convert_mode(ds: Any, col: str, mode: str) -> Any:
    """`ds` with its Image column `col` decoded in PIL mode `mode` (L, RGB); else unchanged."""
    import datasets

    if ds is None or mode == "keep" or not isinstance(ds.features[col], datasets.Image):
        return ds
    return ds.cast_column(col, datasets.Image(mode=mode))


def _open(path: str, subset: str | None, revision: str | None, cache_dir: str | None) -> dict:
    """{split name: datasets.Dataset} from a hub id, a save_to_disk dir or data files."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("dataset 'hf' needs the Hugging Face libraries", key="dataset",
                          value="hf", allowed='pip install -e ".[hf]"') from None
    if os.path.exists(path):
        if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in
                                       ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(path)
        elif os.path.isfile(path):
            kind = os.path.splitext(path)[1].lstrip(".")
            loaded = _guard(lambda: datasets.load_dataset(
                "parquet" if kind == "parquet" else kind, data_files={"train": path},
                cache_dir=cache_dir), path)
        else:
            loaded = _guard(lambda: datasets.load_dataset(path, cache_dir=cache_dir), path)
    elif path.startswith((".", "/", "~")) or path.endswith((".parquet", ".csv", ".json")):
        raise ConfigError("data path not found", key="path", value=path,
                          allowed="a hub id (org/name), a save_to_disk directory or parquet files")
    else:
        loaded = _guard(lambda: datasets.load_dataset(path, subset, revision=revision,
                                                      cache_dir=cache_dir), path)
    return dict(loaded) if isinstance(loaded, dict) else {"train": loaded}


def _guard(load: Any, path: str) -> Any:
    """Run a hub/data-file load; missing or unreachable data becomes a ConfigError (exit 2)."""
    import datasets

    try:
        return load()
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        mode = "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if offline \
            else "the Hugging Face Hub cannot be reached"
        raise ConfigError(f"dataset is not in the Hugging Face cache and {mode}: "
                          f"{str(exc).splitlines()[0]}", key="path", value=path,
                          allowed="fetch it once where the Hub is reachable: python -c \"import "
                          f"datasets; datasets.load_dataset('{path}')\" (cache: HF_HOME, default "
                          "~/.cache/huggingface), or a local save_to_disk/parquet copy") from None
    except ValueError as exc:  # e.g. an unknown config name or unsupported file layout
        raise ConfigError(f"cannot load dataset: {str(exc).splitlines()[0]}", file=path,
                          key="path", value=path) from None


def _split(splits: dict, name: str, key: str, path: str) -> Any:
    if name not in splits:
        raise ConfigError("split not found", file=path, key=key, value=name,
                          allowed=", ".join(sorted(splits)) + (" (or test_split: null with "
                          "test_fraction > 0)" if key == "test_split" else ""))
    return splits[name]


def _columns(ds: Any, input: str | None, label: str | None, client: str | None,
             path: str) -> tuple[str, str, str | None]:
    """(input, label, client id) column names, defaults resolved, each checked to exist."""
    import datasets

    feats = ds.features
    names = list(feats)
    if input is None:
        images = [c for c in names if isinstance(feats[c], datasets.Image)]
        input = images[0] if images else next((c for c in _INPUT_NAMES if c in feats), None)
    if label is None:
        classes = [c for c in names if isinstance(feats[c], datasets.ClassLabel)]
        label = classes[0] if classes else next((c for c in _LABEL_NAMES if c in feats), None)
    for key, col in (("input", input), ("label", label), ("client_column", client)):
        if (col is None and key != "client_column") or (col is not None and col not in feats):
            raise ConfigError("column not found" if col else "cannot guess the column",
                              file=path, key=key, value=col, allowed=", ".join(names))
    return input, label, client  # type: ignore[return-value]


def _read(ds: Any, cols: tuple[str, str, str | None], path: str
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(inputs, labels, client ids) of one split as numpy arrays (images decoded in batches)."""
    import datasets

    inp, lab, cid = cols
    if isinstance(ds.features[lab], datasets.Value) and ds.features[lab].dtype.startswith("float"):
        raise ConfigError("the label column holds floats", file=path, key="label",
                          value=f"{lab} ({ds.features[lab].dtype})",
                          allowed="an integer or ClassLabel column of class ids")
    y = np.asarray(ds.with_format("numpy", columns=[lab])[lab])
    ids = None if cid is None else np.asarray(ds.with_format("numpy", columns=[cid])[cid])
    return _inputs(ds, inp, path), y, ids


def _inputs(ds: Any, col: str, path: str) -> np.ndarray:
    view = ds.with_format("numpy", columns=[col])
    out: np.ndarray | None = None
    for start in range(0, len(ds), _BATCH):
        block = view[start:start + _BATCH][col]
        if block.dtype == object:  # per-row arrays of different shapes within the batch
            shapes = sorted({np.shape(b) for b in block})
            raise ConfigError("samples (images) have mixed shapes", file=path, key="input",
                              value=f"{col}: {shapes[0]} and {shapes[1]} (rows {start}..)",
                              allowed="one shape for every sample (resize first; image_mode "
                              "converts colour modes)")
        if out is None:
            out = np.empty((len(ds), *block.shape[1:]), dtype=block.dtype)
        elif block.shape[1:] != out.shape[1:]:
            raise ConfigError("samples (images) have mixed shapes", file=path, key="input",
                              value=f"{col}: {out.shape[1:]} and {block.shape[1:]} (row {start})",
                              allowed="one shape for every sample (resize first; image_mode "
                              "converts colour modes)")
        out[start:start + len(block)] = block
    if out is None:
        return np.zeros((0,))
    import datasets

    return channels_first(out) if isinstance(ds.features[col], datasets.Image) else out


def _normalize(x: np.ndarray, mean: list[float] | None, std: list[float] | None,
               path: str) -> Normalize | None:
    """Scale 1/255 for uint8 pixels, then (x - mean) / std per channel when given."""
    if x.dtype != np.uint8 and mean is None and std is None:
        return None
    channels = x.shape[1] if x.ndim == 4 else 1
    for key, v in (("mean", mean), ("std", std)):
        if v is not None and len(v) not in (1, channels):
            raise ConfigError(f"{key} needs one value per channel", file=path, key=key, value=v,
                              allowed=f"1 or {channels} values")
    return Normalize(scale=1 / 255 if x.dtype == np.uint8 else 1.0,
                     mean=tuple(mean or (0.0,)), std=tuple(std or (1.0,)))


def _class_count(ds: Any, col: str) -> int | None:
    import datasets

    feat = ds.features[col]
    return feat.num_classes if isinstance(feat, datasets.ClassLabel) else None
