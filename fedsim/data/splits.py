"""Each client's own test split: held out of its training data, or the dataset's own.

`client_splits` partitions the training set (`fedsim.partition`) and gives every client a
test split for per-client evaluation (personalised and fairness metrics:
`fedsim.client_metrics`): ``holdout`` f > 0 keeps round(f n_k) of client k's samples out of
training; with f = 0, clients that coincide with the dataset's natural clients get the
dataset's own test rows for them (LEAF's per-user test files, a test split with a client-id
column, ``test_fraction``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from fedsim import rng
from fedsim.data.arrays import owners, split_rows

if TYPE_CHECKING:
    from fedsim.data import Dataset

HOLDOUT = rng.purpose_id("partition holdout")


@dataclass(frozen=True)
class ClientSplits:
    """Each client's training rows and, when defined, its own test rows.

    Attributes:
      train: per client, sorted rows of ``ds.x_train`` it trains on.
      test: per client, sorted rows of its own test data in ``ds.x_train`` (``test_from``
        "train": held out by ``holdout``) or ``ds.x_test`` ("test": the dataset's own
        per-client test data); None when clients have no test split of their own.
    """

    train: list[np.ndarray]
    test: list[np.ndarray] | None = None
    test_from: Literal["train", "test"] = "test"

    def test_arrays(self, ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) that the `test` rows index (stored arrays; ``ds.features`` normalises)."""
        return (ds.x_train, ds.y_train) if self.test_from == "train" else (ds.x_test, ds.y_test)

    def partitions_test(self, n_test: int) -> bool:
        """Whether the clients' test splits partition the dataset's n_test > 0 test rows (each row
        in exactly one split): then the global test figures are the totals of the per-client ones."""
        if self.test is None or self.test_from != "test" or n_test == 0:
            return False
        parts = [np.asarray(r, dtype=np.int64) for r in self.test]
        rows = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        return rows.size == n_test and bool((rows == np.arange(n_test)).all())


def client_splits(kind: str, params: dict, ds: Dataset, *, num_clients: int,
                  seed: int) -> ClientSplits:
    """Partition ``ds.x_train`` by `kind`, then give every client its own test split.

    ``params["holdout"]`` = f > 0: round(f n_k) of client k's samples (at least one stays
    for training) are its test split, a random subset keyed by (seed, HOLDOUT, k). f = 0:
    clients that coincide with the dataset's natural clients get ``ds.client_test``.
    """
    from fedsim.partition import _partition

    rest = dict(params)
    holdout = float(rest.pop("holdout", 0.0))
    parts = _partition(kind, rest, ds, num_clients=num_clients, seed=seed)
    if holdout > 0:
        train, test = split_rows(parts, holdout, seed, HOLDOUT)
        return ClientSplits(train, test, "train")
    return ClientSplits(parts, _natural_test(parts, ds))


def _natural_test(parts: list[np.ndarray], ds: Dataset) -> list[np.ndarray] | None:
    """Per client, the dataset's own test rows of the natural client it equals (else None).

    Applies when every client's rows are exactly one natural client's rows (``natural``,
    ``flwr-natural``, any subset of whole natural clients).
    """
    if ds.natural_split is None or ds.client_test is None:
        return None
    owner = owners(ds.natural_split, len(ds.y_train))
    out = []
    for p in parts:
        k = int(owner[p[0]])
        if k < 0 or len(p) != len(ds.natural_split[k]) or (owner[p] != k).any():
            return None
        out.append(ds.client_test[k])
    return out
