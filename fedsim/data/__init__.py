"""Datasets: generators and local files, or a Hugging Face cache (no network in tests).

Built in (``DATASETS``, each a ``data.dataset`` plug-in; ``fedsim list datasets`` shows the
keys): ``synthetic`` (LEAF Synthetic(alpha, beta)), ``logistic`` (convex binary problem with a
known generator), ``digits`` (scikit-learn's bundled real data), ``npz`` (arrays from a local
file, optionally with a ``client_id`` array), ``leaf`` (LEAF's JSON format: FEMNIST,
Shakespeare, Sent140) and ``hf`` (Hugging Face / Flower Datasets: a hub id, a directory saved
with ``save_to_disk`` or parquet files; needs the ``[hf]`` extra). All randomness is keyed by
(seed, ``rng.DATASET``, ...). Partitions live in `fedsim.partition` and are re-exported here.

Arrays are stored compactly: images stay uint8 (``Dataset.normalize`` says how they become
floats on the device), text stays int64 token ids, other features are float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedsim.errors import ConfigError
from fedsim.registry import Registry


@dataclass(frozen=True)
class Normalize:
    """How stored integer pixels become model inputs: x_float = (x * scale - mean[c]) / std[c].

    `mean` and `std` have one entry per channel (axis 1 of ``[n, C, H, W]``) or a single entry
    for every feature. ``scale`` = 1/255 maps uint8 pixels to [0, 1].
    """

    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def _stat(self, values: tuple[float, ...], ndim: int) -> np.ndarray:
        v = np.asarray(values, dtype=np.float32)
        return v.reshape(-1, *([1] * (ndim - 2))) if len(v) > 1 else v.reshape(())

    def apply(self, x: np.ndarray) -> np.ndarray:
        """float32 array of the same shape as `x` [n, ...] (numpy; see `apply_torch`)."""
        out = x.astype(np.float32) * np.float32(self.scale)
        return (out - self._stat(self.mean, x.ndim)) / self._stat(self.std, x.ndim)

    def apply_torch(self, x: Any, dtype: Any = None) -> Any:
        """The same map on a torch tensor [n, ...] (on its device), result in `dtype`."""
        import torch

        dt = dtype or torch.float32
        mean = torch.as_tensor(self._stat(self.mean, x.ndim), device=x.device, dtype=dt)
        std = torch.as_tensor(self._stat(self.std, x.ndim), device=x.device, dtype=dt)
        return (x.to(dt) * self.scale - mean) / std


@dataclass(frozen=True)
class Dataset:
    """Train/test arrays of one dataset, plus what defines its natural clients.

    Attributes:
      x_train, x_test: ``[n, *feature_shape]``: float32 features, uint8 pixels (images
        ``[n, C, H, W]``; `normalize` is set) or int64 token ids ``[n, T]`` (`vocab` is set).
      y_train, y_test: int64 ``[n]`` in ``[0, num_classes)``.
      natural_split: per natural client (writer, speaker, generator client), its rows of
        x_train; used by the ``natural`` partition.
      client_test: per natural client (same order), its rows of x_test (its own test data;
        the global test set is all of x_test); None when the data has none.
      client_names: the natural clients' ids as strings (e.g. FEMNIST writer ids).
      normalize: how uint8 pixels become floats (None: x is used as stored).
      vocab: token strings by id (text datasets); ``vocab_size`` = len(vocab).
      source: the file, directory or hub id the data came from (error messages name it).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    natural_split: list[np.ndarray] | None = None
    client_test: list[np.ndarray] | None = None
    client_names: tuple[str, ...] | None = None
    normalize: Normalize | None = None
    vocab: tuple[str, ...] | None = None
    source: str | None = None

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def vocab_size(self) -> int | None:
        return None if self.vocab is None else len(self.vocab)

    def features(self, x: np.ndarray) -> np.ndarray:
        """Model inputs of stored rows `x`: normalised float32 pixels, token ids or features."""
        if self.normalize is not None:
            return self.normalize.apply(x)
        return x if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32, copy=False)


DATASETS = Registry("datasets", reserved=("num_clients", "seed"),
                    builtins=("fedsim.data.builtin", "fedsim.data.npz", "fedsim.data.leaf",
                              "fedsim.data.hf"))


def load_dataset(name: str, params: dict, *, num_clients: int, seed: int) -> Dataset:
    """Build dataset `name` with scenario `params`, checked and in its compact dtypes.

    Features are float32 unless they are uint8 pixels (with `normalize`) or int64 token ids
    (with `vocab`); labels are int64.
    """
    ds = DATASETS.build(name, params, num_clients=num_clients, seed=seed)
    if not isinstance(ds, Dataset):
        raise ConfigError("dataset factory did not return a fedsim.data.Dataset", value=name)
    return _compact(ds)


def _compact(ds: Dataset) -> Dataset:
    def x_of(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype == np.uint8 and ds.normalize is not None:
            return x
        if np.issubdtype(x.dtype, np.integer) and ds.vocab is not None:
            return x.astype(np.int64, copy=False)
        return x.astype(np.float32, copy=False)
    return replace(ds, x_train=x_of(ds.x_train), x_test=x_of(ds.x_test),
                   y_train=np.asarray(ds.y_train, np.int64), y_test=np.asarray(ds.y_test, np.int64))


from fedsim.data.splits import ClientSplits, client_splits  # noqa: E402  (re-export)
from fedsim.partition import PARTITIONS, label_distribution, partition  # noqa: E402

__all__ = ["DATASETS", "PARTITIONS", "ClientSplits", "Dataset", "Normalize", "client_splits",
           "label_distribution", "load_dataset", "partition"]
