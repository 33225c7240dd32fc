"""The simulated system: device speeds, links, collectives, stragglers, and the round clock.

Every client (or gossip node) has a compute speed and a link, drawn once from the scenario's
``system:`` section (`fedsim.config_system.SystemCfg`) and keyed by (seed, SYSTEM, quantity,
client), so they never depend on execution order, chunking or rank layout. A round's simulated
duration follows from what the round actually did:

* compute: the samples a client's gradients touched this round (counted by the kernel's
  oracle) x FLOPs per sample of the model (counted once at set-up by
  `fedsim.models.flops`, which also counts LSTM/GRU and attention) / the client's FLOP/s (or
  samples / samples-per-second);
* communication: latency + 8 * bytes / bandwidth with the bytes the byte rule counts
  (compressed payloads are cheaper in time too); gossip: a node's sends to its neighbours run in
  parallel over its link; data-parallel workers (``network: allreduce``): a ring (or tree)
  all-reduce of the payload, 2 (k - 1) / k * 8 * bytes / bandwidth + 2 (k - 1) * latency;
* a synchronous round lasts as long as its slowest kept participant (download + compute +
  upload) plus the server step; with a one-step-stale reduction (CO2) the communication
  launched after round t overlaps round t+1's compute: the round lasts max(compute,
  previous communication), not their sum.

Stragglers are planned before training, from planned quantities every process computes alike:
selected clients fail with probability ``dropout``; ``over_selection`` f keeps the |S| / f
fastest; a ``deadline`` drops clients that would finish later (``policy: drop``) or caps their
local steps so they finish in time (``partial``). Planning uses the dense payload size for the
upload (the compressed size is known only after training); the clock uses the real bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from fedsim import rng
from fedsim.config_system import LognormalCfg, SystemCfg, UniformCfg

_TAGS = {"speed": 1, "up_bw": 2, "up_lat": 3, "down_bw": 4, "down_lat": 5, "edge_bw": 6,
         "edge_lat": 7}
_JITTER, _DROPOUT = 8, 9


def _normal(seed: int, ids: np.ndarray, *tags: int) -> np.ndarray:
    """Keyed standard normals (Box-Muller on two keyed uniforms)."""
    u1 = rng.uniform_np(seed, rng.SYSTEM, ids, *tags, 0)
    u2 = rng.uniform_np(seed, rng.SYSTEM, ids, *tags, 1)
    return np.sqrt(-2 * np.log1p(-u1)) * np.cos(2 * np.pi * u2)


def per_client(value: Any, n: int, seed: int, tag: int, key: str) -> np.ndarray:
    """float64 [n] of a per-client quantity: a number, n numbers, or a keyed distribution."""
    ids = np.arange(n)
    if isinstance(value, LognormalCfg):
        return value.median * np.exp(value.sigma * _normal(seed, ids, tag))
    if isinstance(value, UniformCfg):
        return value.low + (value.high - value.low) * rng.uniform_np(seed, rng.SYSTEM, ids, tag)
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise ValueError(f"{key}: needs one value per client ({n}), got {len(value)}")
        return np.asarray(value, dtype=np.float64)
    return np.full(n, float(value))


class Plan(NamedTuple):
    """Who is kept this round (mask [N] bool) and each kept client's local-step cap ([N] or None)."""

    mask: np.ndarray
    caps: np.ndarray | None


class SystemModel:
    """Per-client speeds and links of a scenario, and the time each part of a round takes.

    Args:
      cfg: the ``system:`` section. num_clients: N. seed: the root seed.
      flops_per_sample: forward + backward FLOPs of one training sample (speed_unit flops), or
        a function measuring them, called when a round's compute time is first needed (so
        building a scenario never runs the model).
    """

    def __init__(self, cfg: SystemCfg, num_clients: int, seed: int,
                 flops_per_sample: float | Callable[[], float]) -> None:
        n = num_clients
        self.cfg, self.n, self.seed = cfg, n, seed
        def draw(value: Any, tag: str, key: str) -> np.ndarray:
            return per_client(value, n, seed, _TAGS[tag], f"system.{key}")
        self.speed = draw(cfg.speed, "speed", "speed")
        self.up_bw = draw(cfg.uplink.bandwidth, "up_bw", "uplink.bandwidth")
        self.up_lat = draw(cfg.uplink.latency, "up_lat", "uplink.latency")
        self.down_bw = draw(cfg.downlink.bandwidth, "down_bw", "downlink.bandwidth")
        self.down_lat = draw(cfg.downlink.latency, "down_lat", "downlink.latency")
        self.edge_bw = draw(cfg.edges.bandwidth, "edge_bw", "edges.bandwidth")
        self.edge_lat = draw(cfg.edges.latency, "edge_lat", "edges.latency")
        self._cost = flops_per_sample if cfg.speed_unit == "flops" else 1.0

    @property
    def cost(self) -> float:
        """Work units of one sample: its FLOPs (speed_unit flops) or 1 (samples)."""
        if callable(self._cost):
            self._cost = float(self._cost())
        return float(self._cost)

    # ---- the parts of a round --------------------------------------------------------------
    def speeds(self, t: int, ids: np.ndarray) -> np.ndarray:
        """Speeds of `ids` in round t (with the per-round lognormal jitter, keyed by round)."""
        s = self.speed[ids]
        if self.cfg.jitter:
            s = s * np.exp(self.cfg.jitter * _normal(self.seed, ids, _JITTER, t))
        return s

    def compute_seconds(self, t: int, ids: np.ndarray, samples: np.ndarray) -> np.ndarray:
        return np.asarray(samples, dtype=np.float64) * self.cost / self.speeds(t, ids)

    def down_seconds(self, ids: np.ndarray, nbytes: float) -> np.ndarray:
        return self.down_lat[ids] + 8.0 * nbytes / self.down_bw[ids]

    def up_seconds(self, ids: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        return self.up_lat[ids] + 8.0 * np.asarray(nbytes, dtype=np.float64) / self.up_bw[ids]

    def exchange_seconds(self, ids: np.ndarray, nbytes: np.ndarray, degree: np.ndarray) -> np.ndarray:
        """Gossip: a node's payload to each neighbour, the sends in parallel over its link."""
        t = self.edge_lat[ids] + 8.0 * np.asarray(nbytes, dtype=np.float64) / self.edge_bw[ids]
        return np.where(np.asarray(degree) > 0, t, 0.0)

    def allreduce_seconds(self, nbytes: float, k: int) -> float:
        """One all-reduce of `nbytes` per worker among k workers (ring or tree)."""
        if k <= 1:
            return 0.0
        c = self.cfg.collective
        wire = 8.0 * nbytes / c.bandwidth
        if c.algorithm == "ring":
            return 2 * (k - 1) / k * wire + 2 * (k - 1) * c.latency
        return 2 * math.ceil(math.log2(k)) * (wire + c.latency)

    # ---- planning: dropouts, over-selection, deadlines ----------------------------------------
    def plan(self, t: int, mask: np.ndarray, steps: np.ndarray, step_samples: np.ndarray,
             down_bytes: float, up_bytes: float) -> Plan:
        """The kept participants of round t and their step caps.

        Args:
          mask: [N] selected clients. steps: [N] planned local steps (budget or the strategy's).
          step_samples: [N] samples of one local step (minibatch, or the local data).
          down_bytes / up_bytes: what one client receives and (densely) sends.
        """
        cfg, mask = self.cfg, np.asarray(mask, dtype=bool).copy()
        ids = np.flatnonzero(mask)
        if cfg.dropout and ids.size:
            failed = rng.uniform_np(self.seed, rng.SYSTEM, ids, _DROPOUT, t) < cfg.dropout
            mask[ids[failed]] = False
            ids = ids[~failed]
        step_time = self.compute_seconds(t, ids, step_samples[ids])
        comm = self.down_seconds(ids, down_bytes) + self.up_seconds(ids, np.full(ids.size, up_bytes))
        total = comm + steps[ids] * step_time
        if cfg.over_selection > 1 and ids.size:
            keep = max(1, int(round(ids.size / cfg.over_selection)))
            order = np.lexsort((ids, total))[:keep]  # fastest first, ties by client id
            late = np.setdiff1d(np.arange(ids.size), order)
            mask[ids[late]] = False
            ids, step_time, comm, total = ids[order], step_time[order], comm[order], total[order]
        caps = None
        d = cfg.deadline
        if d is not None and d.policy == "drop":
            mask[ids[total > d.seconds]] = False
        elif d is not None:
            fit = np.floor(np.where(step_time > 0, (d.seconds - comm) / np.maximum(step_time, 1e-300),
                                    np.inf)).clip(min=0)
            caps = np.zeros(self.n, dtype=np.int64)
            caps[ids] = np.minimum(fit, steps[ids]).astype(np.int64)
            mask[ids[caps[ids] == 0]] = False
        return Plan(mask, caps)


# ---- the clock -------------------------------------------------------------------------------

@dataclass
class RoundRecord:
    """One round's timing on one process: maxima and sums over its kept participants."""

    max_total: float = 0.0     # slowest participant: down + compute + up (gossip: + exchange)
    max_compute: float = 0.0
    max_comm: float = 0.0
    max_bytes: float = 0.0     # largest payload (all-reduce networks)
    sum_total: float = 0.0
    count: float = 0.0

    def add(self, compute: np.ndarray, comm: np.ndarray, nbytes: np.ndarray) -> None:
        if compute.size == 0:
            return
        total = compute + comm
        self.max_total = max(self.max_total, float(total.max()))
        self.max_compute = max(self.max_compute, float(compute.max()))
        self.max_comm = max(self.max_comm, float(comm.max()))
        self.max_bytes = max(self.max_bytes, float(np.max(nbytes)))
        self.sum_total += float(total.sum())
        self.count += compute.size

    def maxima(self) -> list[float]:
        return [self.max_total, self.max_compute, self.max_comm, self.max_bytes]

    def sums(self) -> list[float]:
        return [self.sum_total, self.count]


@dataclass
class Clock:
    """Simulated seconds since the start, and where they went."""

    now: float = 0.0
    compute: float = 0.0
    comm: float = 0.0
    server: float = 0.0
    idle: float = 0.0          # participants' waiting for the slowest, summed
    participations: float = 0.0
    pending: float = 0.0       # communication still in flight (overlapped with the next round)
    history: list[float] = field(default_factory=list)

    def advance(self, system: SystemModel, maxima: list[float], sums: list[float], *, overlap: bool,
                collective: bool) -> float:
        """Add one round from its global maxima and sums; returns the round's duration.

        `collective`: the participants all-reduce their payload (their own `comm` was recorded as
        0); `overlap`: the round's communication overlaps the next round's compute (staleness).
        """
        max_total, max_compute, max_comm, max_bytes = maxima
        sum_total, count = sums
        if collective:
            max_comm = system.allreduce_seconds(max_bytes, int(count))
            max_total = max_compute + max_comm
        if overlap:
            busy = max(max_compute, self.pending)
            self.pending = max_comm
            waiting = count * max_compute - sum_total if collective else count * busy - sum_total
        else:
            busy = max_total
            waiting = count * max_compute - sum_total if collective else count * max_total - sum_total
        dt = busy + system.cfg.server_time
        self.now += dt
        self.compute += max_compute
        self.comm += busy - max_compute
        self.server += system.cfg.server_time
        self.idle += max(waiting, 0.0)
        self.participations += count
        self.history.append(dt)
        return dt

    def summary(self) -> dict[str, float]:
        mean_idle = self.idle / self.participations if self.participations else 0.0
        return {"time_s": self.now, "compute_s": self.compute, "comm_s": self.comm,
                "server_s": self.server, "idle_client_s_mean": max(mean_idle, 0.0)}


def flops_per_sample(module: Any, x: Any, y: Any) -> float:
    """Forward + backward FLOPs of one training sample: `fedsim.models.flops.step_flops` of one
    cross-entropy step of `module` on the batch (x, y), divided by the batch size."""
    from fedsim.models.flops import step_flops

    return step_flops(module.train(), x, y) / max(int(x.shape[0]), 1)


__all__ = ["SystemModel", "Plan", "RoundRecord", "Clock", "per_client", "flops_per_sample"]
