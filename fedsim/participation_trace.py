"""Availability traces: participation from a CSV of (client, online_from, online_until).

A client is online during each of its intervals [online_from, online_until) in simulated seconds
(the clock of `fedsim.system`); clients the trace does not list are never online. Synchronous
rounds take the clients online when the round starts (if nobody is, the clock waits for the next
client to come online); asynchronous aggregation (`fedsim.asynchrony`) starts only clients that
are online. The file is read once; nothing is random.

CSV header: ``client,online_from,online_until`` (extra columns are ignored); ``online_until``
may be ``inf``. Bad input (a missing file or column, unknown client ids, negative or unordered
times, overlapping intervals of one client) is a `ConfigError` naming the file and line.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from fedsim.errors import ConfigError
from fedsim.participation import PARTICIPATION, Participation

COLUMNS = ("client", "online_from", "online_until")


class TraceParticipation:
    """Clients online at a simulated time, from sorted intervals per client.

    Attributes: starts / ends / owner: float64 / int64 [I] of every interval, sorted by
    (client, start); `probabilities` is None (a trace has no stationary rate).
    """

    clock_driven = True

    def __init__(self, num_clients: int, owner: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
        self.num_clients, self.owner, self.starts, self.ends = num_clients, owner, starts, ends
        self.probabilities: np.ndarray | None = None
        self.p_nominal: np.ndarray | None = None

    def online(self, now: float) -> np.ndarray:
        """[N] bool: clients with an interval holding `now`."""
        out = np.zeros(self.num_clients, dtype=bool)
        out[self.owner[(self.starts <= now) & (now < self.ends)]] = True
        return out

    def next_online(self, now: float) -> float | None:
        """The first interval start after `now` (None: nobody comes online again)."""
        later = self.starts[self.starts > now]
        return float(later.min()) if later.size else None

    def mask(self, round: int) -> np.ndarray:
        """Round-indexed use (no clock): the clients online at time 0."""
        return self.online(0.0)


def _number(text: str, file: str, line: int, column: str, *, integer: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError("not a number", file=file, key=f"line {line}.{column}", value=text) from None
    if math.isnan(value) or value < 0 or (integer and (value != int(value) or math.isinf(value))):
        allowed = "an integer client id >= 0" if integer else "seconds >= 0 (online_until may be inf)"
        raise ConfigError("bad value", file=file, key=f"line {line}.{column}", value=text, allowed=allowed)
    return value


def read_trace(path: str, num_clients: int) -> TraceParticipation:
    """Parse and check the trace CSV at `path` for `num_clients` clients."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("trace file not found", key="file", value=path, allowed="a CSV file on disk")
    rows: list[tuple[int, float, float, int]] = []
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError("missing column", file=path, key="line 1", value=missing[0],
                              allowed="a header with " + ", ".join(COLUMNS))
        for line, rec in enumerate(reader, start=2):
            cid = int(_number(rec["client"] or "", path, line, "client", integer=True))
            if cid >= num_clients:
                raise ConfigError("unknown client id", file=path, key=f"line {line}.client", value=cid,
                                  allowed=f"0 .. {num_clients - 1}")
            lo = _number(rec["online_from"] or "", path, line, "online_from")
            hi = _number(rec["online_until"] or "", path, line, "online_until")
            if hi <= lo or math.isinf(lo):
                raise ConfigError("online_until must be after online_from", file=path,
                                  key=f"line {line}.online_until", value=hi, allowed=f"> {lo}")
            rows.append((cid, lo, hi, line))
    rows.sort()
    for (c0, _, hi0, l0), (c1, lo1, _, l1) in zip(rows, rows[1:], strict=False):
        if c0 == c1 and lo1 < hi0:
            raise ConfigError(f"client {c1}: interval overlaps the one on line {l0}", file=path,
                              key=f"line {l1}.online_from", value=lo1, allowed=f">= {hi0}")
    arr = np.array([r[:3] for r in rows], dtype=np.float64).reshape(-1, 3)
    return TraceParticipation(num_clients, arr[:, 0].astype(np.int64), arr[:, 1], arr[:, 2])


@PARTICIPATION.register("trace")
def trace(*, file: str, num_clients: int, seed: int, label_dist: np.ndarray | None = None) -> Participation:
    """Availability from the CSV trace `file` (client, online_from, online_until; seconds)."""
    return read_trace(file, num_clients)
