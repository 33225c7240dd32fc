"""Keyed, counter-based randomness: every stream is a function of (seed, purpose, ids...).

Nothing here depends on execution order, chunking, rank layout or process count: the value
drawn for client 17 in round 3 is the same whether client 17 is trained alone, in a chunk of
500, on MPI rank 2, or inside a Flower ClientApp. The core is the splitmix64 finalizer,
applied element-wise, so whole blocks of clients draw in one vectorized call, on CPU or GPU.
The numpy (uint64) and torch (int64, two's-complement wrap) versions are bit-identical.

Reference: Steele, Lea, Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

# Purposes: one per kind of random decision. Values are fixed forever (changing one changes results).
INIT = 1           # model initialisation
DATA = 2           # minibatch order: (round, client, epoch)
PARTITION = 3      # dataset split over clients
PARTICIPATION = 4  # which clients take part: (client, round)
COMPRESS = 5       # random compressors: (round, client)
TOPOLOGY = 6       # random graphs
DATASET = 7        # synthetic data generators
SYSTEM = 8         # simulated speeds, links, stragglers
STRATEGY = 9       # randomness inside a strategy: (round, client)
WORK = 10          # heterogeneous local work: (client[, round])
DP = 11            # differential-privacy noise on the server's aggregate: (round, stream, coordinate)
ATTACK = 12        # Byzantine clients: which ones (client), random updates (round, client, coordinate)

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB


def purpose_id(name: str) -> int:
    """Stable id for a purpose given by name (for plug-ins that need their own stream)."""
    return zlib.crc32(name.encode()) + 1000


def _mix_int(z: int) -> int:
    z = (z + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def key(seed: int, purpose: int, *ids: int) -> int:
    """A 64-bit key for the stream (seed, purpose, *ids), as a Python int."""
    h = _mix_int(int(seed) & _M64)
    for v in (purpose, *ids):
        h = _mix_int(h ^ (int(v) & _M64))
    return h


def np_rng(seed: int, purpose: int, *ids: int) -> np.random.Generator:
    """A numpy Generator for the stream (seed, purpose, *ids). For scalar, one-off draws."""
    return np.random.Generator(np.random.PCG64(key(seed, purpose, *ids)))


def torch_gen(seed: int, purpose: int, *ids: int, device: Any = "cpu") -> Any:
    """A torch.Generator seeded for the stream (seed, purpose, *ids)."""
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(key(seed, purpose, *ids) & ((1 << 63) - 1))
    return g


# ---- vectorized (element-wise) versions ------------------------------------------------------

def _mix_np(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_C1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_C2)
        return z ^ (z >> np.uint64(31))


def bits_np(seed: int, purpose: int, *ids: Any) -> np.ndarray:
    """uint64 hash per element of the broadcast of `ids` (ints or integer arrays)."""
    h = np.asarray(key(seed, purpose), dtype=np.uint64)
    for v in ids:
        h = _mix_np(h ^ np.asarray(v).astype(np.int64).astype(np.uint64))
    return h


def uniform_np(seed: int, purpose: int, *ids: Any) -> np.ndarray:
    """float64 in [0, 1), one per element of the broadcast of `ids`."""
    return (bits_np(seed, purpose, *ids) >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= (1 << 63) else c


_S_GOLDEN, _S_C1, _S_C2 = _signed(_GOLDEN), _signed(_C1), _signed(_C2)


def _srl(z: Any, k: int) -> Any:
    """Logical right shift of int64 tensors (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix_torch(z: Any) -> Any:
    z = z + _S_GOLDEN
    z = (z ^ _srl(z, 30)) * _S_C1
    z = (z ^ _srl(z, 27)) * _S_C2
    return z ^ _srl(z, 31)


def bits_torch(seed: int, purpose: int, *ids: Any, device: Any = None) -> Any:
    """int64 tensor of hashes, bit-identical to `bits_np` (same broadcast of `ids`)."""
    import torch

    h = torch.tensor(_signed(key(seed, purpose)), dtype=torch.int64, device=device)
    for v in ids:
        t = v.to(device=h.device, dtype=torch.int64) if torch.is_tensor(v) else \
            torch.as_tensor(np.asarray(v, dtype=np.int64), device=h.device)
        h = _mix_torch(h ^ t)
    return h


def uniform_torch(seed: int, purpose: int, *ids: Any, device: Any = None, dtype: Any = None) -> Any:
    """Uniform [0, 1) tensor (float64 by default), identical to `uniform_np` in float64."""
    import torch

    u = _srl(bits_torch(seed, purpose, *ids, device=device), 11).to(torch.float64) * (2.0 ** -53)
    return u if dtype is None else u.to(dtype)


def normal_torch(seed: int, purpose: int, *ids: Any, device: Any = None, dtype: Any = None) -> Any:
    """Standard normal tensor, one per element of the broadcast of `ids` (Box-Muller on two
    keyed uniforms: the stream (seed, purpose, *ids, 0) and (seed, purpose, *ids, 1))."""
    import torch

    u1 = uniform_torch(seed, purpose, *ids, 0, device=device)
    u2 = uniform_torch(seed, purpose, *ids, 1, device=device)
    z = torch.sqrt(-2 * torch.log1p(-u1)) * torch.cos(2 * torch.pi * u2)
    return z if dtype is None else z.to(dtype)
