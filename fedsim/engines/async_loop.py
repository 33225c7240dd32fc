"""FedBuff / FedAsync rounds of `fedsim.engines.loop.RoundLoop` (multiplex and MPI alike).

One "round" t is the interval between server updates t and t + 1 (`fedsim.asynchrony`): the
global schedule says which clients started (all from model version t) and which updates fill
the buffer. This process trains its own starters as one stacked `client_step` (in memory-bounded
chunks) from the current server model and keeps their payload rows until they arrive; at the
update it sums its buffered rows with the kernel's weights (the strategy's, else n_i / sum_B n_j
over the buffer B) times the staleness weight s(t - start version), and the loop's reduction
(`RoundLoop._finish_reduce`) applies the sum of every process's part. Train losses and uplink
bytes count when an update arrives; the download when a client starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedsim import round as kernel
from fedsim.asynchrony import Interval, Schedule, staleness_weight
from fedsim.comm import weighted_sum
from fedsim.config_system import AsyncCfg
from fedsim.system import Plan, RoundRecord
from fedsim.types import Strategy, Tree
from fedsim.work import budget_tensor

if TYPE_CHECKING:
    from fedsim.engines.loop import RoundLoop


def check_async(strategy: Strategy) -> None:
    """ValueError("<key>: why") when asynchronous aggregation cannot drive `strategy`."""
    if strategy.comm == "mix":
        raise ValueError("system.asynchrony: gossip strategies have no server to buffer updates")
    if strategy.staleness:
        raise ValueError("system.asynchrony: the strategy's own stale reduction (staleness "
                         f"{strategy.staleness}) does not combine with asynchronous aggregation")
    if getattr(strategy, "aggregate", None) is not None:
        raise ValueError("system.asynchrony: a robust aggregator over gathered rows does not "
                         "combine with buffered asynchronous aggregation")


class AsyncRounds:
    """The asynchronous rounds of one `RoundLoop` (see the module docstring)."""

    def __init__(self, loop: RoundLoop, cfg: AsyncCfg) -> None:
        check_async(loop.strategy)
        self.loop, self.cfg = loop, cfg
        part = loop.participation
        online = getattr(part, "online", None)

        def available(now: float, version: int) -> np.ndarray:
            if online is not None:
                return np.asarray(online(now), dtype=bool)
            return kernel.participants(loop.strategy, part, version, loop.num_clients)

        def next_online(now: float) -> float | None:
            return part.next_online(now) if online is not None else None  # type: ignore[union-attr]

        def durations(version: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return kernel.async_durations(loop.strategy, loop.system, loop.work, version, ids, loop.sizes_np,
                                          loop.problem.batch_size, loop.state.server, loop.problem.num_params)

        self.schedule = Schedule(cfg, loop.num_clients, loop.seed, durations, available, next_online)
        self.owned = np.zeros(loop.num_clients, dtype=bool)
        self.owned[loop.owned] = True
        self.rows: dict[int, tuple[Tree, float | None, int]] = {}  # client -> (payload row, loss, bytes)
        self.log: list[tuple[int, int, int, float]] = []  # (update, client, staleness, arrival time)

    # ---- one interval --------------------------------------------------------------------
    def step(self, t: int) -> None:
        loop, s = self.loop, self.loop.state
        iv = self.schedule.interval()
        down = self._train(t, iv.started)
        members = np.array(sorted(a[0] for a in iv.arrivals), dtype=np.int64)
        self.log.extend((t, c, t - v, at) for c, v, at in iv.arrivals)
        mask_np = np.zeros(loop.num_clients, dtype=bool)
        mask_np[members] = True
        mask = torch.as_tensor(mask_np, device=loop.device)
        partial, up = self._partial(t, iv, mask)
        loop._finish_reduce(t, partial, mask, Plan(mask_np, None))
        self.schedule.applied(loop.system.cfg.server_time)
        total = iv.compute + iv.comm
        loop.clock.interval(self.schedule.now, iv.compute / total if total > 0 else 1.0,
                            loop.system.cfg.server_time, len(iv.arrivals), iv.waited)
        loop._round_bytes.append((up, down))
        loop._round_times.append(RoundRecord())
        s.round = t + 1

    def _train(self, t: int, started: np.ndarray) -> int:
        """Train this process's starters from version t; returns the bytes sent down to them."""
        loop, strat, s = self.loop, self.loop.strategy, self.loop.state
        mine = started[self.owned[started]]
        if mine.size == 0:
            return 0
        mask_np = np.zeros(loop.num_clients, dtype=bool)
        mask_np[started] = True
        mask = torch.as_tensor(mask_np, device=loop.device)
        for ids in loop._chunks(torch.as_tensor(mine, device=loop.device)):
            steps = budget_tensor(loop.work, t, ids)
            ctx = kernel.make_ctx(t, loop.seed, ids, mask, loop.sizes, loop.dtype, steps)
            out = kernel.client_step(strat, s.server, s.store.gather(ids), loop.problem, ctx)
            s.store.scatter(ids, out.clients)
            loss = out.loss.double().tolist() if out.loss is not None else [None] * ids.numel()
            for i, c in enumerate(ids.tolist()):
                self.rows[c] = ({k: v[i] for k, v in out.payload.items()}, loss[i], int(out.up_bytes[i]))
        return kernel.broadcast_bytes(strat, s.server) * int(mine.size)

    def _partial(self, t: int, iv: Interval, mask: torch.Tensor) -> tuple[Tree | None, int]:
        """This process's share of the buffer's weighted sum, and its uplink bytes."""
        loop, strat, s = self.loop, self.loop.strategy, self.loop.state
        version = {c: v for c, v, _ in iv.arrivals}
        mine = sorted(c for c in version if self.owned[c])
        if not mine:
            return None, 0
        rows = [self.rows.pop(c) for c in mine]
        for _, loss, _ in rows:
            if loss is not None:
                loop.train_loss[0] += loss
                loop.train_loss[1] += 1
        ids = torch.as_tensor(mine, device=loop.device)
        payload = {k: torch.stack([r[0][k] for r in rows]) for k in rows[0][0]}
        ctx = kernel.make_ctx(t, loop.seed, ids, mask, loop.sizes, loop.dtype)
        w: Any = strat.weights(s.server, ctx) if strat.weights else ctx.weight
        tau = np.array([t - version[c] for c in mine])
        scale = torch.as_tensor(staleness_weight(self.cfg.staleness, tau), device=loop.device)
        if isinstance(w, dict):
            w = {k: v * scale.to(v.dtype) for k, v in w.items()}
        else:
            w = w * scale.to(w.dtype)
        return weighted_sum(payload, w), sum(r[2] for r in rows)

    # ---- checkpoints ---------------------------------------------------------------------
    def rows_state(self) -> dict[str, Any]:
        """This process's trained rows not yet applied (a checkpoint's client part)."""
        ids = sorted(self.rows)
        keys = list(self.rows[ids[0]][0]) if ids else []
        return {"ids": ids, "loss": [self.rows[c][1] for c in ids], "bytes": [self.rows[c][2] for c in ids],
                "payload": {k: torch.stack([self.rows[c][0][k] for c in ids]).cpu() for k in keys}}

    def load(self, schedule: dict[str, Any], parts: list[dict[str, Any]]) -> None:
        """Restore the schedule and this process's rows from every checkpoint part."""
        self.schedule.load(schedule)
        self.rows = {}
        for part in parts:
            for i, c in enumerate(part["ids"]):
                if self.owned[c]:
                    row = {k: v[i].to(self.loop.device) for k, v in part["payload"].items()}
                    self.rows[int(c)] = (row, part["loss"][i], int(part["bytes"][i]))
