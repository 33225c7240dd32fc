"""Conversions between fedsim trees (named torch tensors) and Flower records, and byte counts.

Arrays travel as Flower's `Array` with `stype = "numpy.ndarray"`, whose `data` is the `.npy`
serialisation (`np.save`). Encoding and decoding here produce and read exactly those bytes
(tested against `np.save` / `Array.numpy()`), with the `.npy` header cached per dtype and
shape: a round with thousands of small messages does not pay `np.save` / `np.load` for each.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedsim.types import Tree

NUMPY_STYPE = "numpy.ndarray"
_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}
_PARSED: dict[bytes, tuple[tuple[int, ...], bool, np.dtype]] = {}


def _header(arr: np.ndarray) -> bytes:
    """The `.npy` (version 1.0) header `np.save` writes for a C-contiguous `arr`."""
    key = (arr.dtype.str, arr.shape)
    head = _HEADERS.get(key)
    if head is None:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
        head = _HEADERS[key] = buf.getvalue()
    return head


def encode(arr: np.ndarray) -> Any:
    """numpy array -> Flower `Array` (the bytes `Array(arr)` would hold)."""
    from flwr.app import Array

    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    return Array(str(arr.dtype), tuple(int(s) for s in arr.shape), NUMPY_STYPE,
                 _header(arr) + arr.tobytes())


def decode(array: Any) -> np.ndarray:
    """Flower `Array` -> a writable numpy array (a copy of its data)."""
    data = array.data
    if array.stype != NUMPY_STYPE or data[:6] != b"\x93NUMPY":
        return np.array(array.numpy())
    size = 2 if data[6] == 1 else 4
    offset = 8 + size + int.from_bytes(data[8:8 + size], "little")
    head = data[:offset]
    parsed = _PARSED.get(head)
    if parsed is None:
        buf = io.BytesIO(data)
        version = np.lib.format.read_magic(buf)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        parsed = _PARSED[head] = read(buf)
    shape, fortran, dtype = parsed
    if fortran or dtype.hasobject:
        return np.array(array.numpy())
    count = int(np.prod(shape))
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape).copy()


def tree_to_record(tree: Tree) -> Any:
    """Tree -> `ArrayRecord` (one array per key; dtype and shape kept, moved to host)."""
    from flwr.app import ArrayRecord

    return ArrayRecord({k: encode(v.detach().cpu().numpy()) for k, v in tree.items()})


def rows_to_records(tree: Tree, m: int) -> list[Any]:
    """Tree of [m, ...] tensors -> m `ArrayRecord`s, record j holding rows j:j+1 of every key."""
    from flwr.app import ArrayRecord

    host = {k: v.detach().cpu().numpy() for k, v in tree.items()}
    return [ArrayRecord({k: encode(v[j:j + 1]) for k, v in host.items()}) for j in range(m)]


def record_to_tree(record: Any, device: torch.device | str = "cpu") -> Tree:
    """`ArrayRecord` -> Tree on `device` (dtype as sent)."""
    return {k: torch.from_numpy(decode(a)).to(device) for k, a in record.items()}


def stack_records(records: Sequence[Any], device: torch.device | str = "cpu") -> Tree:
    """Records of [1, ...] rows (the same keys) -> Tree of [m, ...] tensors on `device`."""
    if not records:
        return {}
    keys = list(records[0].keys())
    return {k: torch.from_numpy(np.concatenate([decode(r[k]) for r in records])).to(device)
            for k in keys}


def model_record(x: torch.Tensor | np.ndarray, spec: Any) -> Any:
    """Flat model [P] -> `ArrayRecord` with one array per parameter tensor (name, shape), as
    a PyTorch `state_dict` would give it (what Flower strategies aggregate)."""
    from flwr.app import ArrayRecord

    host = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    return ArrayRecord({name: encode(host[o:o + int(np.prod(s))].reshape(s))
                        for name, s, o in zip(spec.names, spec.shapes, spec.offsets, strict=True)})


def record_model(record: Any, spec: Any, device: torch.device | str, dtype: torch.dtype
                 ) -> torch.Tensor:
    """Inverse of `model_record`: [P] on `device` in `dtype` (ValueError on other keys/shapes)."""
    if set(record.keys()) != set(spec.names):
        raise ValueError(f"model record keys {sorted(record.keys())[:5]}... are not the "
                         f"model's parameters {list(spec.names)[:5]}...")
    parts = []
    for name, shape in zip(spec.names, spec.shapes, strict=True):
        a = decode(record[name])
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"array {name!r} has shape {a.shape}, the model's is {shape}")
        parts.append(a.reshape(-1))
    return torch.from_numpy(np.concatenate(parts)).to(device, dtype)


def message_bytes(message: Any) -> int:
    """Bytes a Message carries: `count_bytes()` of each of its records (0 for an error)."""
    if not message.has_content():
        return 0
    return sum(int(r.count_bytes()) for r in message.content.values())


def pack_mask(mask: np.ndarray) -> bytes:
    """[N] bool -> N/8 bytes (a ConfigRecord value)."""
    return np.packbits(np.asarray(mask, dtype=bool)).tobytes()


def unpack_mask(data: bytes, n: int) -> np.ndarray:
    """Inverse of `pack_mask`."""
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n).astype(bool)


def copy_content(content: Any) -> Any:
    """A RecordDict whose records are fresh containers over the same (immutable) array bytes.

    An in-process runtime hands each node its own copy, as a network would: a ClientApp that
    edits the records it received cannot change what another node receives.
    """
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    out = RecordDict()
    for k, r in content.items():
        if isinstance(r, ArrayRecord):
            out[k] = ArrayRecord(dict(r.items())) if len(r) else ArrayRecord()
        elif isinstance(r, ConfigRecord):
            out[k] = ConfigRecord(dict(r.items()))
        elif isinstance(r, MetricRecord):
            out[k] = MetricRecord(dict(r.items()))
        else:  # pragma: no cover - future record kinds
            out[k] = r
    return out
