"""Running a sweep: the sweep folder, its index ``sweep.json``, and the local launcher.

Sweep folder layout (the folder is the unit of resumption: rerunning the same command skips the
finished points and runs the others again):

  sweep.json             the index: the sweep's axes and every point's status (ok, failed,
                         interrupted, running, pending, submitted), error, attempts, wall time
  <point id>/            the run folder of a finished point (exists only once the point succeeded)
  <label>-<stamp>.partial/   an attempt that failed or was interrupted (kept for inspection; the
                         run's name is the point's label, its config.yaml has the seed)
  .points/<id>.yaml      the point's scenario: `fedsim run .points/<id>.yaml` reruns it by hand
  .points/<id>.log       its stderr (warnings, the one-line error of a failed point)

Every point runs as ``fedsim run .points/<id>.yaml --out SWEEP --quiet``: in this process when
``jobs`` is 1 (no interpreter start-up per point), otherwise in ``jobs`` child processes at a time;
a point whose ``engine.kind`` is ``mpi`` always in a child started by the ``mpiexec`` template.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INDEX = "sweep.json"
POINTS = ".points"
INTERRUPTED_CODES = (130, 143, -signal.SIGINT, -signal.SIGTERM)


@dataclass
class Outcome:
    """How one attempt of a point ended."""

    status: str               # ok | failed | interrupted
    error: str | None = None
    wall_s: float | None = None
    signal: int = 0           # the signal that interrupted it (SIGINT or SIGTERM), if any


def finished(sweep_dir: str, pid: str) -> bool:
    """True when the point's run folder exists with ``status: ok`` (the filesystem is the truth)."""
    try:
        with open(os.path.join(sweep_dir, pid, "summary.json"), encoding="utf-8") as fh:
            return json.load(fh).get("status") == "ok"
    except (OSError, ValueError):
        return False


class Index:
    """``sweep.json``: written atomically (temp file + rename) after every change, by one thread at a time."""

    def __init__(self, sweep_dir: str, meta: dict[str, Any], points: dict[str, dict[str, Any]]) -> None:
        """`points`: id -> the point's description (label, seed, overrides) for this sweep."""
        self.path = os.path.join(sweep_dir, INDEX)
        self._lock = threading.Lock()
        doc: dict[str, Any] = {}
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as fh:
                doc = json.load(fh)
        old = {p["id"]: p for p in doc.get("points", [])}
        entries = {pid: {"id": pid, "status": "pending", "attempts": 0, **old.get(pid, {}), **desc}
                   for pid, desc in points.items()}
        entries.update({pid: e for pid, e in old.items() if pid not in entries})  # earlier sweeps'
        for pid, e in entries.items():
            if finished(sweep_dir, pid):
                e.update(status="ok", error=None)
            elif e.get("status") in ("ok", "running"):
                e["status"] = "interrupted"  # folder gone, or a driver that died mid-point
        self.data = {**meta, "created": doc.get("created", meta.get("created")),
                     "points": list(entries.values())}
        self._by_id = {e["id"]: e for e in self.data["points"]}
        self.save()

    def set(self, pid: str, **fields: Any) -> None:
        with self._lock:
            self._by_id[pid].update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
            self.save()

    def get(self, pid: str) -> dict[str, Any]:
        return self._by_id[pid]

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.data, fh, indent=1, default=str)
        os.replace(tmp, self.path)


def resumable_attempt(sweep_dir: str, pid: str) -> str | None:
    """The newest earlier attempt of point `pid` holding a checkpoint of this point's scenario
    (None: start afresh).

    Failed and interrupted attempts stay in the sweep folder as ``<label>-<stamp>.partial``;
    points of one label (other seeds) are told apart by the checkpoint's scenario fingerprint.
    """
    from fedsim import checkpoint as ckpt
    from fedsim.config import load_scenario, to_dict
    from fedsim.errors import ConfigError

    sc = load_scenario(os.path.join(sweep_dir, POINTS, f"{pid}.yaml"))
    fingerprint = ckpt.digest(to_dict(sc))
    attempts = [os.path.join(sweep_dir, d) for d in os.listdir(sweep_dir)
                if d.startswith(f"{sc.name}-") and d.endswith(".partial")]
    for attempt in sorted(attempts, key=os.path.getmtime, reverse=True):
        try:
            ckpt.read(ckpt.latest(attempt), fingerprint)
        except ConfigError:
            continue
        return attempt
    return None


def launch_args(sweep_dir: str, pid: str) -> list[str]:
    """The `fedsim` command line of the next attempt of point `pid` (every launcher uses it):
    `fedsim resume` of its newest checkpointed attempt, else a fresh `fedsim run`."""
    attempt = resumable_attempt(sweep_dir, pid)
    if attempt is not None:
        return ["resume", attempt, "--quiet"]
    return ["run", os.path.join(sweep_dir, POINTS, f"{pid}.yaml"), "--out", sweep_dir, "--quiet"]


def conclude(sweep_dir: str, pid: str, code: int, stdout: str) -> Outcome:
    """Outcome of an attempt from its exit code and output; a success moves the run folder
    ``<label>-<stamp>`` to ``<pid>``."""
    if code in INTERRUPTED_CODES:
        signum = -code if code < 0 else code - 128
        return Outcome("interrupted", error=_error_line(sweep_dir, pid) or f"exit code {code}",
                       signal=signum)
    if code != 0:
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return Outcome("failed", error=_error_line(sweep_dir, pid) or why)
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    run = lines[-1].strip() if lines else ""
    dest = os.path.join(sweep_dir, pid)
    if not os.path.isdir(run):
        return Outcome("failed", error=f"the run printed no run folder (got {run!r})")
    if os.path.exists(dest):
        return Outcome("failed", error=f"{dest} exists but is not a finished run; remove it")
    os.replace(run, dest)
    with open(os.path.join(dest, "summary.json"), encoding="utf-8") as fh:
        return Outcome("ok", wall_s=json.load(fh).get("wall_s"))


def _log(sweep_dir: str, pid: str) -> str:
    return os.path.join(sweep_dir, POINTS, f"{pid}.log")


def _error_line(sweep_dir: str, pid: str) -> str | None:
    try:
        with open(_log(sweep_dir, pid), encoding="utf-8", errors="replace") as fh:
            errs = [ln.strip() for ln in fh if ln.startswith("error:")]
    except OSError:
        return None
    if not errs:
        return None
    return errs[-1][len("error:"):].replace("(set FEDSIM_DEBUG=1 for a traceback)", "").strip()


def run_inprocess(sweep_dir: str, pid: str) -> Outcome:
    """One attempt in this process, through the CLI (same exit codes and messages as a child)."""
    from fedsim.cli import main

    out = io.StringIO()
    with open(_log(sweep_dir, pid), "w", encoding="utf-8") as log, redirect_stdout(out), \
            redirect_stderr(log):
        code = main(launch_args(sweep_dir, pid))
    return conclude(sweep_dir, pid, code, out.getvalue())


def child_env(threads: int) -> dict[str, str]:
    """Environment of a point's child process: `threads` intra-op threads unless the user chose,
    and fedsim importable exactly as here."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, str(threads))
    here = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


def threads_per_process(jobs: int, ranks: int) -> int:
    """CPU threads for each of `jobs` concurrent points of `ranks` processes: the cores, divided."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // (jobs * ranks))


class LocalPool:
    """Runs points as child processes, `jobs` at a time; Ctrl-C or SIGTERM interrupts them."""

    def __init__(self, sweep_dir: str, jobs: int, mpiexec: str, ranks: int) -> None:
        self.sweep_dir, self.jobs, self.mpiexec, self.ranks = sweep_dir, jobs, mpiexec, ranks
        self._procs: dict[str, subprocess.Popen[str]] = {}
        self._lock, self._stop = threading.Lock(), threading.Event()

    def command(self, pid: str, mpi: bool) -> list[str]:
        cmd = [sys.executable, "-m", "fedsim", *launch_args(self.sweep_dir, pid)]
        return shlex.split(self.mpiexec.format(ranks=self.ranks)) + cmd if mpi else cmd

    def _attempt(self, pid: str, mpi: bool, on_start: Any) -> Outcome | None:
        if self._stop.is_set():
            return None
        env = child_env(threads_per_process(self.jobs, self.ranks if mpi else 1))
        with open(_log(self.sweep_dir, pid), "w", encoding="utf-8") as log:
            with self._lock:
                if self._stop.is_set():
                    return None
                proc = subprocess.Popen(self.command(pid, mpi), stdout=subprocess.PIPE, stderr=log,
                                        text=True, env=env, start_new_session=True)
                self._procs[pid] = proc
            on_start(pid)
            out, _ = proc.communicate()
        with self._lock:
            self._procs.pop(pid, None)
        return conclude(self.sweep_dir, pid, proc.returncode, out)

    def run(self, todo: list[tuple[str, bool]], on_start: Any, on_done: Any) -> None:
        """Run (point id, is-mpi) pairs; `on_done(pid, outcome)` in this thread as each ends."""
        with ThreadPoolExecutor(self.jobs) as ex:
            futs = {ex.submit(self._attempt, pid, mpi, on_start): pid for pid, mpi in todo}
            reported = set()
            try:
                for f in as_completed(futs):
                    reported.add(f)
                    if (outcome := f.result()) is not None:
                        on_done(futs[f], outcome)
            except KeyboardInterrupt:
                self.interrupt()
                for f, pid in futs.items():
                    if f not in reported and not f.cancel() and (outcome := f.result()) is not None:
                        on_done(pid, outcome)
                raise

    GRACE_S = 10.0

    def interrupt(self) -> None:
        """Stop starting points; send SIGINT to the running ones: they finish their round,
        checkpoint and end as interrupted; a second SIGINT after `GRACE_S` seconds makes those
        still in a round abandon it (their previous checkpoint stays)."""
        with self._lock:
            self._stop.set()
            self._signal_all()
        timer = threading.Timer(self.GRACE_S, self._again)
        timer.daemon = True
        timer.start()

    def _again(self) -> None:
        with self._lock:
            self._signal_all()

    def _signal_all(self) -> None:
        for proc in self._procs.values():
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except OSError:
                pass

