"""Buffered asynchronous aggregation on the simulated clock: FedBuff and FedAsync.

FedBuff (Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS
2022, arXiv 2106.06639, Algorithm 1): `concurrency` C clients train at once, each from the model
current when it starts; the server buffers arriving updates and, once `buffer` K have arrived,
applies their weighted sum, each scaled by a staleness weight s(tau) (tau = server updates since
the client started; default 1 / sqrt(1 + tau)). FedAsync (Xie et al., "Asynchronous Federated
Optimization", 2019, arXiv 1903.03934) is K = 1 (its delta form, as FedBuff compares it).

The schedule here is global and pure: durations come from planned quantities (the work budget x
samples per step x FLOPs / speed, the broadcast down and the dense payload up) that every process
computes alike, so the event order (simulated time, ties by client id) never depends on ranks or
chunking, and clients starting from one model version can be trained together. Conventions:
* a server update is one "round" t (the model version t -> t + 1), so `rounds` counts updates;
* a client whose update sits in the buffer does not start again before the buffer is applied
  (so C = K = N, no staleness, is exactly FedAvg, and a client trains at most once per version);
* free slots are filled after every arrival, after every update (which takes `server_time`) and
  when a client comes online (traces), with the available idle clients of smallest keyed uniform
  u(seed, SYSTEM, client, 10, draw);
* if nobody is in flight and nobody can start, the clock waits for the next client to come online
  (availability traces), or, if none ever will, the buffer is applied as it is.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsim import rng
from fedsim.config_system import AsyncCfg, StalenessCfg

_DRAW = 10  # SYSTEM stream tag of the start draws


def staleness_weight(cfg: StalenessCfg, tau: np.ndarray) -> np.ndarray:
    """s(tau) float64 [m] for staleness tau [m] >= 0 (Xie et al. 2019, sec. 5.2)."""
    tau = np.asarray(tau, dtype=np.float64)
    if cfg.kind == "constant":
        return np.ones_like(tau)
    if cfg.kind == "hinge":
        return np.where(tau <= cfg.b, 1.0, 1.0 / (cfg.a * (tau - cfg.b) + 1.0))
    return (1.0 + tau) ** -cfg.a


@dataclass
class Interval:
    """What happened between two server updates: the clients started (all from the current
    version), the arrivals (client, start version) that fill the buffer, in event order, and
    the planned (compute, communication) seconds of the arrivals, for the clock's breakdown.
    Arrivals are (client, start version, arrival time)."""

    started: np.ndarray
    arrivals: list[tuple[int, int, float]]
    compute: float = 0.0
    comm: float = 0.0
    waited: float = 0.0


@dataclass
class Schedule:
    """The global event schedule of FedBuff (the same on every process).

    Args:
      cfg: the ``system.asynchrony`` section. n: N clients. seed: root seed.
      durations: (version, ids [m]) -> (compute [m], comm [m]) planned seconds of a start.
      available: (now, version) -> [N] bool clients that may start.
      next_online: now -> the next time a client comes online (None: no traces / never).
    """

    cfg: AsyncCfg
    n: int
    seed: int
    durations: Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]]
    available: Callable[[float, int], np.ndarray]
    next_online: Callable[[float], float | None]
    now: float = 0.0
    version: int = 0
    draws: int = 0
    flights: list[tuple[float, int, int, float, float]] = field(default_factory=list)  # heap
    buffer: list[tuple[int, int, float]] = field(default_factory=list)

    def _fill(self, out: list[np.ndarray]) -> None:
        """Start idle available clients at `now` until C are in flight."""
        free = self.cfg.concurrency - len(self.flights)
        if free <= 0:
            return
        idle = np.asarray(self.available(self.now, self.version), dtype=bool).copy()
        busy = [f[1] for f in self.flights] + [b[0] for b in self.buffer]
        idle[busy] = False
        ids = np.flatnonzero(idle)
        if ids.size == 0:
            return
        u = rng.uniform_np(self.seed, rng.SYSTEM, ids, _DRAW, self.draws)
        self.draws += 1
        ids = np.sort(ids[np.lexsort((ids, u))[:free]])
        compute, comm = self.durations(self.version, ids)
        for c, a, b in zip(ids.tolist(), compute.tolist(), comm.tolist(), strict=True):
            heapq.heappush(self.flights, (self.now + a + b, c, self.version, a, b))
        out.append(ids)

    def interval(self) -> Interval:
        """Run events until the buffer holds K updates (or nothing more can arrive)."""
        started: list[np.ndarray] = []
        compute = comm = waited = 0.0
        while len(self.buffer) < self.cfg.buffer:
            self._fill(started)
            nxt = self.next_online(self.now) if len(self.flights) < self.cfg.concurrency else None
            if not self.flights:
                if nxt is None:
                    break
                waited += nxt - self.now
                self.now = nxt
                continue
            if nxt is not None and nxt < self.flights[0][0]:  # a client comes online: a free slot
                self.now = nxt
                continue
            finish, c, v, a, b = heapq.heappop(self.flights)
            self.now = max(self.now, finish)
            self.buffer.append((c, v, self.now))
            compute, comm = compute + a, comm + b
        ids = np.concatenate(started) if started else np.zeros(0, dtype=np.int64)
        return Interval(ids, list(self.buffer), compute, comm, waited)

    def applied(self, server_time: float) -> None:
        """The buffer was applied: the next version, `server_time` later, then refill."""
        self.buffer = []
        self.version += 1
        self.now += server_time

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds (plain Python values)."""
        return {"now": self.now, "version": self.version, "draws": self.draws,
                "flights": [list(f) for f in self.flights], "buffer": [list(b) for b in self.buffer]}

    def load(self, state: dict[str, Any]) -> None:
        self.now, self.version, self.draws = float(state["now"]), int(state["version"]), int(state["draws"])
        self.flights = [(float(f), int(c), int(v), float(a), float(b)) for f, c, v, a, b in state["flights"]]
        heapq.heapify(self.flights)
        self.buffer = [(int(c), int(v), float(a)) for c, v, a in state["buffer"]]


__all__ = ["Schedule", "Interval", "staleness_weight"]
