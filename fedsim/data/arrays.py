"""Checks and conversions that every file format shares (npz, LEAF JSON, Hugging Face).

Each check raises `ConfigError` naming the data file, the key (array, column or JSON field),
the bad value and what is allowed, so a bad file exits 2 with one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsim import rng
from fedsim.errors import ConfigError

if TYPE_CHECKING:
    from fedsim.data import Dataset

HOLDOUT = rng.purpose_id("per-client test split")


def int_labels(y: Any, *, file: str | None, key: str) -> np.ndarray:
    """Labels as int64 [n]: integers, or floats that are all integral; >= 0; 1-D.

    Floats with a fractional part (a regression target), strings and 2-D arrays are errors.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ConfigError("labels must be 1-D (one class id per sample)", file=file, key=key,
                          value=f"shape {y.shape}", allowed="an integer array of shape [n]")
    if np.issubdtype(y.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(y) | (np.mod(y, 1) != 0))
        if bad.size:
            raise ConfigError("labels are floats with a fractional part (a regression target?)",
                              file=file, key=key, value=float(y[bad[0]]),
                              allowed="integer class ids 0..C-1 (an integer or ClassLabel column)")
    elif not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise ConfigError("labels must be integer class ids", file=file, key=key,
                          value=f"{y.dtype} (e.g. {y[0]!r})" if y.size else str(y.dtype),
                          allowed="integer class ids 0..C-1")
    if y.size and y.min() < 0:
        raise ConfigError("labels must be non-negative class ids", file=file, key=key,
                          value=int(y.min()), allowed="0..C-1")
    return y.astype(np.int64)


def num_classes_of(ys: Sequence[np.ndarray], given: int | None, *, file: str | None) -> int:
    """`given`, checked against the labels, or max label + 1."""
    top = max((int(y.max()) + 1 for y in ys if y.size), default=1)
    if given is not None and top > given:
        raise ConfigError("a label is >= num_classes", file=file, key="num_classes", value=given,
                          allowed=f">= {top}")
    return given or top


def stack_samples(items: Sequence[Any], *, file: str | None, key: str) -> np.ndarray:
    """One array [n, *shape] from per-sample arrays; mixed shapes are an error naming rows."""
    first = np.shape(items[0]) if len(items) else ()
    for i, item in enumerate(items):
        if np.shape(item) != first:
            raise ConfigError("samples (images) have mixed shapes", file=file, key=key,
                              value=f"row 0 has shape {first}, row {i} has {np.shape(item)}",
                              allowed="one shape for every sample (resize the images first, "
                              "or set image_mode to convert the colour mode)")
    return np.stack([np.asarray(item) for item in items]) if len(items) else np.zeros((0,))


def channels_first(x: np.ndarray) -> np.ndarray:
    """Images [n, H, W] -> [n, 1, H, W]; [n, H, W, C] (C <= 4) -> [n, C, H, W]."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] <= 4 and x.shape[1] > 4:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def compact_unit_floats(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """Floats that are all k/255 (LEAF's FEMNIST pixels) as uint8 k; else `x` unchanged.

    Returns (array, True) when converted, so the caller records a 1/255 scale.
    """
    if not np.issubdtype(x.dtype, np.floating) or x.size == 0:
        return x, False
    if x.min() < 0 or x.max() > 1:
        return x, False
    k = np.rint(x * 255.0)
    if np.abs(x * 255.0 - k).max() > 1e-3:
        return x, False
    return k.astype(np.uint8), True


def client_groups(ids: Any, *, file: str | None, key: str, singletons_ok: bool = False,
                  column: str | None = None) -> tuple[tuple[str, ...], list[np.ndarray]]:
    """Rows of each distinct client id, ids in sorted order (as Flower's NaturalIdPartitioner).

    Returns (names, groups): groups[k] holds the rows (ascending) whose id is names[k].
    A column in which every sample has its own id (a per-sample id, not a client id) is
    an error (unless `singletons_ok`: test splits may be tiny), as are float and 2-D ids.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or np.issubdtype(ids.dtype, np.floating):
        raise ConfigError("client ids must be a 1-D array of integers or strings", file=file,
                          key=key, value=f"{ids.dtype}, shape {ids.shape}",
                          allowed="one integer or string client id per sample")
    names, inv = np.unique(ids, return_inverse=True)
    counts = np.bincount(inv.reshape(-1), minlength=len(names))
    if not singletons_ok and len(ids) > 1 and counts.max() == 1:
        raise ConfigError("every client id occurs once: this looks like a per-sample id, "
                          "not a client id", file=file, key=key,
                          value=f"{column or key}: {len(names)} distinct ids in {len(ids)} rows",
                          allowed="a column that groups samples by client (e.g. FEMNIST's "
                          "writer_id), or no client column with an iid/dirichlet partition")
    order = np.argsort(inv.reshape(-1), kind="stable")
    groups = np.split(order.astype(np.int64), np.cumsum(counts)[:-1])
    return tuple(str(n) for n in names.tolist()), groups


def split_rows(groups: Sequence[np.ndarray], fraction: float, seed: int, purpose: int
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Hold out round(fraction * n_k) rows of every group (at least one row stays in train).

    The rows held out of group k are a random subset keyed by (seed, purpose, k), so a
    client's split does not depend on the other clients. Both outputs are sorted.
    """
    train, test = [], []
    for k, rows in enumerate(groups):
        n = len(rows)
        n_test = min(int(round(n * fraction)), n - 1) if n else 0
        pick = rng.np_rng(seed, purpose, k).permutation(n)
        test.append(np.sort(rows[pick[:n_test]]))
        train.append(np.sort(rows[pick[n_test:]]))
    return train, test


def owners(groups: Sequence[np.ndarray], n: int) -> np.ndarray:
    """int64 [n]: the group (client) of every row, -1 for rows in no group."""
    owner = np.full(n, -1, dtype=np.int64)
    for k, rows in enumerate(groups):
        owner[rows] = k
    return owner


def blocks(sizes: Sequence[int]) -> list[np.ndarray]:
    """Consecutive row ranges of the given sizes: [0, s0), [s0, s0 + s1), ..."""
    ends = np.cumsum(np.asarray(sizes, dtype=np.int64))
    return [np.arange(e - n, e, dtype=np.int64) for e, n in zip(ends, sizes, strict=True)]


def gather_clients(x: np.ndarray, y: np.ndarray, groups: Sequence[np.ndarray]
                   ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Rows of `groups` stored client after client, and each client's block of new rows."""
    order = np.concatenate(list(groups)) if len(groups) else np.zeros(0, np.int64)
    return x[order], y[order], blocks([len(g) for g in groups])


def match_test_clients(names: tuple[str, ...], test_ids: Any, *, file: str | None, key: str
                       ) -> list[np.ndarray]:
    """Per training client (by name), its rows of the test split (empty if it has none)."""
    test_names, groups = client_groups(test_ids, file=file, key=key, singletons_ok=True)
    where = dict(zip(test_names, groups, strict=True))
    return [where.get(n, np.zeros(0, np.int64)) for n in names]


def assemble(name: str, x: np.ndarray, y: np.ndarray, *, ids: Any = None,
             test: tuple[np.ndarray, np.ndarray, Any] | None = None, test_fraction: float,
             seed: int, file: str | None, id_key: str, num_classes: int | None = None,
             id_column: str | None = None, **fields: Any) -> Dataset:
    """A `Dataset` from checked arrays: natural clients from `ids`, a test set, client tests.

    Args:
      x, y: all training rows [n, ...] and int64 labels [n].
      ids: per-row client ids [n] (natural clients, sorted by id) or None.
      test: (x_test, y_test, test_ids or None) when the data has its own test split; then
        client k's own test rows are those whose test id is client k's id.
      test_fraction: without `test`: hold out this fraction of every client's rows (of all
        rows when there are no ids) as the test set, keyed by (seed, HOLDOUT, k).
      fields: further `Dataset` fields (normalize, vocab, ...).
    """
    from fedsim.data import Dataset

    if test is None and test_fraction <= 0:
        raise ConfigError("the data has no test split", file=file, key="test_fraction",
                          value=test_fraction, allowed="a fraction in (0, 1) to hold out of "
                          "every client's samples, or a test split")
    names = split = client_test = None
    if ids is not None:
        names, groups = client_groups(ids, file=file, key=id_key, column=id_column)
    else:
        groups = [np.arange(len(y), dtype=np.int64)]
    if test is None:
        groups, test_groups = split_rows(groups, test_fraction, seed, HOLDOUT)
        x_te, y_te, te_blocks = gather_clients(x, y, test_groups)
        client_test = te_blocks if ids is not None else None
    else:
        x_te, y_te, test_ids = test
        if names is not None and test_ids is not None:
            client_test = match_test_clients(names, test_ids, file=file, key=f"{id_key} (test)")
    if ids is not None:
        x, y, split = gather_clients(x, y, groups)
    elif test is None:
        x, y = x[groups[0]], y[groups[0]]
    k = num_classes_of([y, y_te], num_classes, file=file)
    return Dataset(name, x, y, x_te, y_te, k, natural_split=split, client_test=client_test,
                   client_names=names, source=file, **fields)
