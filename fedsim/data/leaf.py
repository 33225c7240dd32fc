"""``dataset: leaf``: LEAF's JSON format (Caldas et al. 2018, arXiv 1812.01097).

LEAF's preprocessing (``preprocess.sh``) writes one or more JSON files per split, each
``{"users": [u...], "num_samples": [n_u...], "user_data": {u: {"x": [...], "y": [...]}}}``,
under ``data/<name>/data/{train,test}/``. Users are the natural clients (FEMNIST writers,
Shakespeare speaking roles, Sent140 Twitter users); a user's test rows are its own test data.
x per sample: FEMNIST a list of 784 floats (pixels k/255, stored here as uint8), Shakespeare a
string of 80 characters (y: the next character), Sent140 a list of raw fields whose
`text_field` is the tweet (y: 0/1).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from fedsim.data import DATASETS, Dataset, Normalize
from fedsim.data.arrays import assemble, compact_unit_floats, int_labels, stack_samples
from fedsim.data.text import CharVocab, Tokens, encode_text, is_text, next_char_labels
from fedsim.errors import ConfigError

PosInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Split = tuple[list[Any], list[Any], list[str]]  # x, y, user id per sample


@DATASETS.register("leaf")
def leaf(*, path: str, test_path: str | None = None, input_shape: list[PosInt] | None = None,
         test_fraction: Fraction = 0.0, num_classes: PosInt | None = None,
         tokens: Tokens = "chars", vocab: CharVocab = "leaf", seq_len: PosInt = 25,
         vocab_size: PosInt = 10000, text_field: int = -1, num_clients: int,
         seed: int) -> Dataset:
    """LEAF JSON files (FEMNIST, Shakespeare, Sent140): users are the natural clients.

    `path` is a .json file, a directory of .json files, or a LEAF data directory with
    ``train/`` and ``test/`` subdirectories; `test_path` (file or directory) overrides the
    test files. Without test files `test_fraction` of every user's samples is its test data.
    `input_shape` reshapes each sample (FEMNIST: [1, 28, 28]). Text inputs become token ids:
    `tokens` chars (`vocab` leaf: LEAF's 80 characters, or data) or words (`vocab_size`,
    `seq_len`; Sent140 takes field `text_field` of each raw sample).
    """
    train_files, test_files = _files(path, "path"), None
    if test_path is not None:
        test_files = _files(test_path, "test_path")
    elif os.path.isdir(os.path.join(path, "test")):
        test_files = _files(os.path.join(path, "test"), "path")
    x, y, ids = _read_split(train_files, text_field)
    test = _read_split(test_files, text_field) if test_files else ([], [], [])
    src = train_files[0] if len(train_files) == 1 else path
    x_tr, x_te, y_tr, y_te, extra = _encode(x, y, test[0], test[1], src, tokens=tokens,
                                            vocab=vocab, seq_len=seq_len, vocab_size=vocab_size)
    if input_shape is not None:
        x_tr, x_te = (_reshape(a, input_shape, src) for a in (x_tr, x_te))
    has_test = test_files is not None
    if is_text(y):  # next-character prediction: one class per vocabulary entry
        num_classes = num_classes or len(extra["vocab"])
    return assemble("leaf", x_tr, y_tr, ids=np.asarray(ids),
                    test=(x_te, y_te, np.asarray(test[2])) if has_test else None,
                    test_fraction=test_fraction, seed=seed, file=src, id_key="users",
                    num_classes=num_classes, **extra)


def _files(path: str, key: str) -> list[str]:
    """The .json files of `path` (a file, a dir of files, or a dir with train/), sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ConfigError("LEAF data not found", key=key, value=path,
                          allowed="a .json file or a directory of them (LEAF's data/<name>/data)")
    root = os.path.join(path, "train") if os.path.isdir(os.path.join(path, "train")) else path
    files = sorted(glob.glob(os.path.join(root, "*.json")))
    if not files:
        raise ConfigError("no .json files in the LEAF directory", file=root, key=key,
                          allowed="the output of LEAF's preprocess.sh (train/*.json)")
    return files


def _read_split(files: list[str], text_field: int) -> Split:
    xs: list[Any] = []
    ys: list[Any] = []
    ids: list[str] = []
    for f in files:
        for user, x, y in _read_file(f):
            if x and isinstance(x[0], list) and x[0] and isinstance(x[0][0], str):
                x = [s[text_field] for s in x]  # Sent140: raw fields, the tweet text
            xs.extend(x)
            ys.extend(y)
            ids.extend([user] * len(y))
    return xs, ys, ids


def _read_file(path: str) -> list[tuple[str, list[Any], list[Any]]]:
    """(user, x, y) of every user of one LEAF JSON file, with num_samples checked."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read LEAF JSON: {exc}", file=path) from None
    need = ("users", "num_samples", "user_data")
    if not isinstance(doc, dict) or any(k not in doc for k in need):
        missing = next(k for k in need if not isinstance(doc, dict) or k not in doc)
        raise ConfigError("not a LEAF JSON file", file=path, key=missing,
                          allowed="an object with keys users, num_samples, user_data")
    users, counts, data = doc["users"], doc["num_samples"], doc["user_data"]
    if len(users) != len(counts):
        raise ConfigError("users and num_samples have different lengths", file=path,
                          key="num_samples", value=(len(users), len(counts)))
    out = []
    for i, (u, n) in enumerate(zip(users, counts, strict=True)):
        d = data.get(u) if isinstance(data, dict) else None
        if not isinstance(d, dict) or "x" not in d or "y" not in d:
            raise ConfigError("user has no x/y data", file=path, key=f"user_data.{u}",
                              allowed="{'x': [...], 'y': [...]} for every user")
        if not (len(d["x"]) == len(d["y"]) == n):
            raise ConfigError(f"num_samples of user {u!r} does not match its data", file=path,
                              key=f"num_samples[{i}]", value=n,
                              allowed=f"{len(d['y'])} (len of user_data.{u}.y; x has "
                              f"{len(d['x'])})")
        out.append((str(u), d["x"], d["y"]))
    return out


def _encode(x: list[Any], y: list[Any], x_te: list[Any], y_te: list[Any], src: str, *,
            tokens: Tokens, vocab: CharVocab, seq_len: int, vocab_size: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Samples as compact arrays: token ids, uint8 pixels or float32 features; int64 labels."""
    extra: dict[str, Any] = {}
    if is_text(x):
        labels = [*y, *y_te] if is_text(y) else ()
        a, b, v = encode_text(x, x_te, tokens=tokens, vocab=vocab, seq_len=seq_len,
                              vocab_size=vocab_size, file=src, key="x", labels=labels)
        extra["vocab"] = v
        if is_text(y):
            return (a, b, next_char_labels(y, v, file=src, key="y"),
                    next_char_labels(y_te, v, file=src, key="y"), extra)
    else:
        a = stack_samples(x, file=src, key="x").astype(np.float32)
        b = stack_samples(x_te, file=src, key="x").astype(np.float32) if x_te else \
            np.zeros((0, *a.shape[1:]), np.float32)
        if b.shape[1:] != a.shape[1:]:
            raise ConfigError("train and test samples have different shapes", file=src,
                              key="x", value=(a.shape[1:], b.shape[1:]))
        (a8, ok_a), (b8, ok_b) = compact_unit_floats(a), compact_unit_floats(b)
        if ok_a and (ok_b or not len(b)):  # every pixel k/255: store k as uint8
            a, b, extra["normalize"] = a8, b8.astype(np.uint8), Normalize()
    return (a, b, int_labels(np.asarray(y), file=src, key="y"),
            int_labels(np.asarray(y_te, dtype=np.int64 if not y_te else None), file=src,
                       key="y"), extra)


def _reshape(x: np.ndarray, shape: list[int], src: str) -> np.ndarray:
    if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
        raise ConfigError("input_shape does not match the samples", file=src, key="input_shape",
                          value=shape, allowed=f"a shape with {int(np.prod(x.shape[1:]))} "
                          "elements per sample")
    return x.reshape(len(x), *shape)
