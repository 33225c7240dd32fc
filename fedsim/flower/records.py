"""Conversions between fedsim trees (named torch tensors) and Flower records, and byte counts."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedsim.types import Tree


def tree_to_record(tree: Tree) -> Any:
    """Tree -> `ArrayRecord` (one array per key; dtype and shape kept, moved to host)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in tree.items()})


def record_to_tree(record: Any, device: torch.device | str = "cpu") -> Tree:
    """`ArrayRecord` -> Tree on `device` (dtype as sent)."""
    return {k: torch.as_tensor(np.array(a.numpy()), device=device) for k, a in record.items()}


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
