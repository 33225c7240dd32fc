"""``dataset: npz``: arrays from a local ``.npz`` file (``numpy.savez``), natural clients optional.

Arrays (every error names the .npz file and the array):
  x_train [n, ...], y_train [n]            required
  x_test [m, ...], y_test [m]              optional (else `test_fraction` > 0)
  client_id [n]                            optional: natural clients (``partition: natural``)
  client_id_test [m]                       optional: client ids of the test rows (each
                                           client's own test data, for per-client metrics)
"""

from __future__ import annotations

import os
import zipfile
import zlib
from typing import Annotated

import numpy as np
from pydantic import Field

from fedsim.data import DATASETS, Dataset, Normalize
from fedsim.data.arrays import assemble, int_labels
from fedsim.errors import ConfigError

PosInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
_KNOWN = ("x_train", "y_train", "x_test", "y_test", "client_id", "client_id_test")


@DATASETS.register("npz")
def npz(*, path: str, num_classes: PosInt | None = None, test_fraction: Fraction = 0.0,
        num_clients: int, seed: int) -> Dataset:
    """Arrays x_train, y_train [, x_test, y_test, client_id, client_id_test] from a local .npz.

    uint8 features are kept as uint8 and scaled by 1/255 on the device; other features are
    cast to float32. Labels are non-negative integer class ids (integral floats accepted);
    `num_classes` defaults to max label + 1. With a `client_id` array the file defines natural
    clients (``partition: natural``), and `test_fraction` (when there is no x_test) holds out
    that fraction of every client's samples as its own test data. A relative `path` is
    relative to the working directory.
    """
    a = _read(path)
    x, y = a["x_train"], int_labels(a["y_train"], file=path, key="y_train")
    _same_length(x, y, "x_train", "y_train", path)
    ids = a.get("client_id")
    if ids is not None:
        _same_length(ids, y, "client_id", "y_train", path)
    test = None
    if "x_test" in a:
        x_te, y_te = a["x_test"], int_labels(a["y_test"], file=path, key="y_test")
        _same_length(x_te, y_te, "x_test", "y_test", path)
        if x.shape[1:] != x_te.shape[1:]:
            raise ConfigError("x_train and x_test feature shapes differ", file=path,
                              key="x_test", value=(x.shape[1:], x_te.shape[1:]))
        ids_te = a.get("client_id_test")
        if ids_te is not None:
            if ids is None:
                raise ConfigError("client_id_test needs a client_id array", file=path,
                                  key="client_id_test", allowed="both arrays, or neither")
            _same_length(ids_te, y_te, "client_id_test", "y_test", path)
        test = (x_te, y_te, ids_te)
    scale = Normalize() if x.dtype == np.uint8 else None
    return assemble("npz", x, y, ids=ids, test=test, test_fraction=test_fraction, seed=seed,
                    file=path, id_key="client_id", num_classes=num_classes, normalize=scale)


def _same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str, path: str) -> None:
    if a.ndim == 0 or len(a) != len(b):
        raise ConfigError(f"{name_a} and {name_b} lengths differ", file=path, key=name_a,
                          value=(np.shape(a), np.shape(b)), allowed=f"{len(b)} rows, one per sample")


def _read(path: str) -> dict[str, np.ndarray]:
    """The known arrays of the file; corrupt, truncated or incomplete files are ConfigErrors."""
    if not os.path.isfile(path):
        raise ConfigError("data file not found", key="path", value=path)
    try:
        with np.load(path, allow_pickle=False) as f:
            names = set(f.files)
            for req in ("x_train", "y_train"):
                if req not in names:
                    raise ConfigError(f"missing array {req!r} in .npz file", file=path, key=req,
                                      allowed="arrays " + ", ".join(_KNOWN) + " (the first two "
                                      "required; x_test with y_test)")
            if ("x_test" in names) != ("y_test" in names):
                missing = "y_test" if "x_test" in names else "x_test"
                raise ConfigError(f"missing array {missing!r} in .npz file", file=path,
                                  key=missing, allowed="x_test and y_test together, or neither")
            return {k: f[k] for k in _KNOWN if k in names}
    except ConfigError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise ConfigError(f"cannot read .npz file (corrupt or truncated?): {exc}",
                          file=path, allowed="a file written by numpy.savez") from None
