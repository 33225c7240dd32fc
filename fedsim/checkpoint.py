"""Checkpoints of a run: everything that changes from round to round, written atomically.

A checkpoint is a folder ``<run>/checkpoint/round-<t>/`` holding ``state.pt`` (the round to run
next, the server state, the stale reductions still to apply, byte and time counters, the training
loss accumulated since the last evaluation, and how many metrics lines were written) and one
``clients-<r>.pt`` per process (the per-client state rows of the clients it holds, with their
ids). Every stream of randomness is keyed by (seed, purpose, id, round), so no RNG state is saved:
a run resumed at round t is the uninterrupted run from round t. ``<run>/checkpoint/latest``
names the newest complete checkpoint; it is replaced (write + rename) only once every file of the
new one is in place, so a kill while writing leaves the previous checkpoint valid.

Files are read with ``torch.load(weights_only=True)`` (tensors and plain containers only), and a
checkpoint written by another scenario, or not by fedsim, is refused with the file and the reason.
A write that fails (a full disk, a file-size limit, a read-only folder) raises one OSError naming
the checkpoint file and the system's reason, as a failed metrics write does (`fedsim.run`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import yaml

from fedsim.errors import ConfigError
from fedsim.round import ByteCounter
from fedsim.system import Clock
from fedsim.types import Tree

FORMAT, VERSION = "fedsim-checkpoint", 1
FOLDER, LATEST = "checkpoint", "latest"
# scenario keys that may change between an interrupted run and its resumption
_FREE = ("rounds", "checkpoint", "output", "engine", "name")


def digest(scenario: dict[str, Any]) -> str:
    """A fingerprint of everything in a resolved scenario that shapes its trajectory."""
    kept = {k: v for k, v in scenario.items() if k not in _FREE}
    kept["engine.dtype"] = (scenario.get("engine") or {}).get("dtype")
    return hashlib.sha256(yaml.safe_dump(kept, sort_keys=True).encode()).hexdigest()[:20]


def every(rounds: int, configured: int | None) -> int:
    """Rounds between checkpoints: the configured number (0: only at the end), else a tenth."""
    if configured is not None:
        return configured
    return max(1, rounds // 10)


@dataclass
class Control:
    """What a run's round loop needs to checkpoint and to stop cleanly.

    Attributes:
      folder: the run folder (checkpoints go to its ``checkpoint/``).
      every: rounds between checkpoints (0: only at the end).
      digest: the scenario fingerprint written into each checkpoint.
      lines: returns the number of metrics lines written so far.
      signal: returns the number of a stop signal received (0: none).
      resume: a checkpoint folder to start from (None: round 0).
    """

    folder: str
    every: int
    digest: str
    lines: Any
    signal: Any
    resume: str | None = None

    def due(self, t: int, rounds: int) -> bool:
        return t + 1 == rounds or (self.every > 0 and (t + 1) % self.every == 0)


class Interrupted(Exception):
    """The run stopped at a round boundary on a signal, after writing a checkpoint."""

    def __init__(self, signum: int, round: int) -> None:
        super().__init__(f"signal {signum} at round {round}")
        self.signum, self.round = signum, round


def staging(folder: str, round: int) -> str:
    return os.path.join(folder, FOLDER, f"round-{round:08d}.tmp")


@contextlib.contextmanager
def _writing(path: str, tmp: str) -> Iterator[None]:
    """Writes of checkpoint file `path` (through `tmp`): any failure becomes one OSError
    ``cannot write PATH: REASON`` with the system's errno and reason where there is one (torch's
    own error, e.g. "unexpected pos 576 vs 534", hides the OSError it chains), `tmp` removed."""
    try:
        yield
    except (OSError, RuntimeError) as exc:  # torch.save raises RuntimeError over the OSError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno), None)
        if cause is None:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise OSError(f"cannot write {path}: {type(exc).__name__}: {first}") from None
        code = int(cause.errno or 0)
        raise OSError(code, f"cannot write {path}: {cause.strerror or os.strerror(code)}") from None


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc`, then what it was raised from or while handling, and so on."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def write_part(folder: str, round: int, name: str, payload: dict[str, Any]) -> None:
    """One file of the checkpoint of `round` (every process writes its own clients part)."""
    path = staging(folder, round)
    tmp = os.path.join(path, f".{name}.tmp")
    with _writing(os.path.join(path, name), tmp):
        os.makedirs(path, exist_ok=True)
        with open(tmp, "wb") as fh:  # a Python file: a failed write chains its OSError
            torch.save(payload, fh)
        os.replace(tmp, os.path.join(path, name))


_SWEEPS: list[threading.Thread] = []
_SWEEPS_LOCK = threading.Lock()


def settle() -> None:
    """Wait until superseded checkpoints are removed (before a run folder is renamed)."""
    with _SWEEPS_LOCK:
        pending, _SWEEPS[:] = list(_SWEEPS), []
    for th in pending:
        th.join()


def _sweep(paths: list[str]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def commit(folder: str, round: int) -> str:
    """Publish the staged checkpoint of `round` (after every part was written) and drop older ones.

    Older published folders are removed on a background thread (unlinks cost milliseconds on
    network and journaling file systems; nothing reads a superseded checkpoint): `settle` waits
    for it, as the next commit and the run's close do. Staging folders a killed process left
    are removed at once (a later round of this run may stage under the same name).
    """
    settle()
    base = os.path.join(folder, FOLDER)
    final = os.path.join(base, f"round-{round:08d}")
    tmp = os.path.join(base, f".{LATEST}.tmp")
    with _writing(os.path.join(base, LATEST), tmp):
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staging(folder, round), final)
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(os.path.basename(final) + "\n")
        os.replace(tmp, os.path.join(base, LATEST))
    old = [os.path.join(base, e) for e in os.listdir(base)
           if e.startswith("round-") and e != os.path.basename(final)]
    _sweep([p for p in old if p.endswith(".tmp")])  # a killed run's staging: a later round may reuse it
    old = [p for p in old if not p.endswith(".tmp")]
    if old:
        th = threading.Thread(target=_sweep, args=(old,), name="fedsim-checkpoint-sweep", daemon=True)
        with _SWEEPS_LOCK:
            _SWEEPS.append(th)
        th.start()
    return final


def latest(folder: str) -> str:
    """The newest complete checkpoint of run folder `folder` (ConfigError when there is none)."""
    pointer = os.path.join(folder, FOLDER, LATEST)
    if not os.path.isfile(pointer):
        raise ConfigError("no checkpoint in this run folder (was it written by `fedsim run` "
                          "with checkpoints?)", file=pointer)
    with open(pointer, encoding="utf-8") as fh:
        name = fh.read().strip()
    path = os.path.join(folder, FOLDER, name)
    if not name.startswith("round-") or not os.path.isfile(os.path.join(path, "state.pt")):
        raise ConfigError(f"the checkpoint pointer names {name!r}, which is not a complete "
                          "checkpoint", file=pointer)
    return path


def read(path: str, expect_digest: str) -> dict[str, Any]:
    """state.pt of checkpoint `path`, checked (ConfigError naming the file and why)."""
    file = os.path.join(path, "state.pt")
    state = _load(file)
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise ConfigError(f"not a fedsim checkpoint (format {state.get('format')!r}, version "
                          f"{state.get('version')!r}; expected {FORMAT!r} version {VERSION})", file=file)
    if state.get("digest") != expect_digest:
        raise ConfigError("the checkpoint was written by a different scenario (only rounds, "
                          "checkpoint, output, engine and name may change on resume)", file=file,
                          value=state.get("digest"), allowed=expect_digest)
    return state


def client_parts(path: str) -> list[dict[str, Any]]:
    """Every process's client rows of checkpoint `path`: the parts clients-0..R-1 of the R
    processes that wrote it (R as rank 0's part records it). A part of another layout can lie
    beside them when a killed run of more processes left its staging folder for the same
    round and the resumed run staged there again; it is not part of this checkpoint."""
    names = sorted(n for n in os.listdir(path) if n.startswith("clients-") and n.endswith(".pt"))
    parts = [_load(os.path.join(path, n)) for n in names]
    ranks = int(parts[0].get("ranks", len(parts))) if parts else 0
    return [p for p in parts if int(p.get("ranks", ranks)) == ranks][:ranks]


def _cpu(tree: Tree) -> Tree:
    return {k: v.detach().cpu() for k, v in tree.items()}


def state_payload(control: Control, round: int, server: Tree, stale: list[Tree], counter: ByteCounter,
                  clock: Clock, **extra: Any) -> dict[str, Any]:
    """state.pt of the checkpoint before round `round` (engine-specific entries in `extra`)."""
    return {"format": FORMAT, "version": VERSION, "digest": control.digest, "round": round,
            "lines": int(control.lines()), "server": _cpu(server), "stale": [_cpu(t) for t in stale],
            "bytes": {"up": counter.up, "down": counter.down,
                      "per_round": [list(r) for r in counter.per_round]},
            "clock": dataclasses.asdict(clock), **extra}


def clients_payload(ids: torch.Tensor, rows: Tree, train_loss: list[float], rank: int = 0,
                    ranks: int = 1) -> dict[str, Any]:
    """clients-<rank>.pt: the state rows of the clients `ids` one process holds."""
    return {"ids": ids.cpu(), "rows": _cpu(rows), "train_loss": list(train_loss), "rank": rank,
            "ranks": ranks}


@dataclass
class Restored:
    """A checkpoint read back: what every engine restores (tensors on `device`)."""

    round: int
    server: Tree
    stale: list[Tree]
    counter: ByteCounter
    clock: Clock
    parts: list[dict[str, Any]]
    state: dict[str, Any]

    def rows(self, owned: np.ndarray | None = None) -> tuple[torch.Tensor, Tree]:
        """(ids, state rows) of the clients in the checkpoint (only those in `owned`, if given)."""
        ids = torch.cat([p["ids"] for p in self.parts]) if self.parts else torch.zeros(0, dtype=torch.int64)
        keys = list(self.parts[0]["rows"]) if self.parts else []
        rows = {k: torch.cat([p["rows"][k] for p in self.parts]) for k in keys}
        if owned is None:
            return ids, rows
        mine = torch.as_tensor(np.isin(ids.numpy(), owned))
        return ids[mine], {k: v[mine] for k, v in rows.items()}

    def train_loss(self, rank: int, ranks: int) -> list[float]:
        """This process's share of the training loss accumulated since the last evaluation:
        its own with the same layout, else the totals on rank 0 (what an evaluation reduces)."""
        if len(self.parts) == ranks and all(p["ranks"] == ranks for p in self.parts):
            return list(self.parts[rank]["train_loss"])
        total = [sum(p["train_loss"][j] for p in self.parts) for j in (0, 1)]
        return total if rank == 0 else [0.0, 0.0]


def restore(path: str, digest: str, device: Any) -> Restored:
    """Checkpoint `path` read and checked against scenario fingerprint `digest`."""
    state = read(path, digest)
    b = state["bytes"]

    def dev(tree: Tree) -> Tree:
        return {k: v.to(device) for k, v in tree.items()}
    return Restored(int(state["round"]), dev(state["server"]), [dev(t) for t in state["stale"]],
                    ByteCounter(int(b["up"]), int(b["down"]), [(int(u), int(d)) for u, d in b["per_round"]]),
                    Clock(**state["clock"]), client_parts(path), state)


def _load(file: str) -> dict[str, Any]:
    try:
        out = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError("checkpoint file is missing", file=file) from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file: truncated, not a torch file, pickled code
        raise ConfigError(f"cannot read the checkpoint: {type(exc).__name__}: {exc}", file=file) from None
    if not isinstance(out, dict):
        raise ConfigError("not a fedsim checkpoint (not a mapping)", file=file)
    return out


__all__ = ["digest", "every", "Control", "Interrupted", "write_part", "commit", "latest", "read",
           "client_parts", "state_payload", "clients_payload", "Restored", "restore", "FORMAT", "VERSION"]
