"""`fedsim sweep` end to end: validate every point, list them (``--dry-run``) or run the unfinished
ones with the chosen launcher, keep ``sweep.json`` current, and report.

Exit status: 0 when every point of the sweep has finished, 1 when any failed (the others still
ran), 2 for bad input (before anything runs), 130 / 143 when interrupted by SIGINT / SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import asdict
from typing import Any

import yaml

from fedsim.config import Scenario, to_dict
from fedsim.errors import ConfigError
from fedsim.signals import signals_restored
from fedsim.stats import flatten
from fedsim.sweep import Point, SweepSpec, point_raw, points, validate_point
from fedsim.sweep_run import POINTS, Index, LocalPool, Outcome, finished, run_inprocess


def sweep_folder(base: dict[str, Any], spec: SweepSpec, out: str | None) -> str:
    """`--out`, else ``sweep.out``, else ``<output.dir>/<name>-sweep`` (fixed, so reruns resume)."""
    if out or spec.out:
        return str(out or spec.out)
    output = base["output"] if isinstance(base.get("output"), dict) else {}
    return os.path.join(str(output.get("dir", "runs")), f"{base.get('name', 'run')}-sweep")


def prepare(base: dict[str, Any], spec: SweepSpec, source: str) -> list[tuple[Point, Scenario]]:
    """Every point with its resolved scenario, validated as `fedsim validate` would (data, model,
    strategy built; on the slurm launcher without the device, which only the compute node has)."""
    seed, name = base.get("seed", 0), base.get("name", "run")
    pts = points(spec, seed if isinstance(seed, int) and not isinstance(seed, bool) else 0,
                 str(name))
    return [(p, validate_point(base, p, source, build=True, cpu_only=spec.launcher == "slurm"))
            for p in pts]


def check_unchanged(sweep_dir: str, point: Point, sc: Scenario) -> None:
    """A finished point must have run with this point's scenario (else: exit 2, the first key
    that differs); ``name`` and ``output`` do not count."""
    if not finished(sweep_dir, point.id):
        return
    with open(os.path.join(sweep_dir, point.id, "config.yaml"), encoding="utf-8") as fh:
        old = flatten(yaml.safe_load(fh) or {})
    new = flatten(to_dict(sc))
    for k in sorted(set(old) | set(new)):
        if k == "name" or k.startswith("output."):
            continue
        if old.get(k) != new.get(k):
            raise ConfigError(f"point {point.id} already ran with {k}={old.get(k)!r}, this sweep "
                              f"gives {k}={new.get(k)!r}", file=sweep_dir,
                              allowed="another --out, or remove that point's folder to rerun it")


def dry_run(sweep_dir: str, prepared: list[tuple[Point, Scenario]], spec: SweepSpec) -> int:
    """Print every (validated) point: finished or pending, strategy, engine, overrides."""
    print(f"sweep {sweep_dir}: {len(prepared)} points, launcher {spec.launcher}, jobs {spec.jobs}")
    for p, sc in prepared:
        state = "finished" if finished(sweep_dir, p.id) else "pending"
        sets = " ".join(f"{k}={v}" for k, v in p.overrides)
        print(f"  {state:<8}  {p.id}  [{sc.strategy.name}, {sc.engine.kind}]  {sets}")
    print(f"all {len(prepared)} points are valid")
    return 0


def _meta(source: str, spec: SweepSpec, sweep_dir: str, seeds: list[int]) -> dict[str, Any]:
    """The sweep-level part of sweep.json: where it came from and its axes."""
    return {"fedsim_sweep": 1, "scenario": source, "folder": os.path.abspath(sweep_dir),
            "launcher": spec.launcher, "grid": spec.grid,
            "cases": {axis: list(cases) for axis, cases in spec.cases.items()},
            "seeds": seeds, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


_TERMINATED: list[bool] = []


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM, delivered like Ctrl-C so that the same clean-up runs (and exit 143).

    Only the first raises: a second SIGTERM (two points signalling at once, or a scheduler
    repeating it) must not break off the clean-up that interrupts the running points, which
    would leave the driver waiting on children nobody told to stop."""
    first = not _TERMINATED
    _TERMINATED.append(True)
    if first:
        raise KeyboardInterrupt


def run_sweep(base: dict[str, Any], spec: SweepSpec, source: str, out: str | None = None,
              dry: bool = False, quiet: bool = False) -> int:
    """Validate, then list (`dry`) or run the sweep; returns the exit status."""
    sweep_dir = sweep_folder(base, spec, out)
    prepared = prepare(base, spec, source)
    if spec.launcher == "slurm":
        from fedsim.sweep_slurm import check_params

        check_params(spec, mpi=any(sc.engine.kind == "mpi" for _, sc in prepared))
    for p, sc in prepared:
        check_unchanged(sweep_dir, p, sc)
    if dry:
        return dry_run(sweep_dir, prepared, spec)
    os.makedirs(os.path.join(sweep_dir, POINTS), exist_ok=True)
    for p, _ in prepared:
        with open(os.path.join(sweep_dir, POINTS, f"{p.id}.yaml"), "w", encoding="utf-8") as fh:
            yaml.safe_dump(point_raw(base, p), fh, sort_keys=False)
    seeds = list(dict.fromkeys(p.seed for p, _ in prepared))
    index = Index(sweep_dir, _meta(source, spec, sweep_dir, seeds),
                  {p.id: {"label": p.label, "seed": p.seed, "overrides": dict(p.overrides)}
                   for p, _ in prepared})
    todo = [(p.id, sc.engine.kind == "mpi") for p, sc in prepared if not finished(sweep_dir, p.id)]
    code = _dispatch(sweep_dir, spec, index, todo, quiet)
    _report(sweep_dir, index, [p.id for p, _ in prepared], len(prepared) - len(todo))
    print(sweep_dir)
    failed = any(index.get(p.id)["status"] != "ok" for p, _ in prepared)
    return code or (1 if failed else 0)


def _dispatch(sweep_dir: str, spec: SweepSpec, index: Index, todo: list[tuple[str, bool]],
              quiet: bool) -> int:
    """Run the `todo` points; 0, or 130 / 143 when interrupted."""
    done = [0]

    def on_start(pid: str, **extra: Any) -> None:
        index.set(pid, status=extra.pop("status", "running"), error=None,
                  attempts=index.get(pid).get("attempts", 0) + 1,
                  started=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)

    def on_done(pid: str, o: Outcome) -> None:
        index.set(pid, **asdict(o))
        done[0] += 1
        if not quiet:
            tail = f"({o.wall_s:.1f} s)" if o.wall_s is not None else f"- {o.error}"
            print(f"[{done[0]}/{len(todo)}] {o.status:<11} {pid} {tail}", file=sys.stderr)

    with signals_restored((signal.SIGTERM, signal.SIGINT)) as mine:
        if signal.SIGTERM in mine:
            signal.signal(signal.SIGTERM, _on_sigterm)
        # A driver started with SIGINT ignored (`fedsim sweep ... &` in a script) would hand that
        # to its points, which then could not be interrupted while setting up: handle it here.
        if signal.SIGINT in mine:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return _run_points(sweep_dir, spec, todo, on_start, on_done)


def _run_points(sweep_dir: str, spec: SweepSpec, todo: list[tuple[str, bool]], on_start: Any,
                on_done: Any) -> int:
    """Run the points with the driver's signal handlers in place; 0, or 130 / 143 when interrupted."""
    _TERMINATED.clear()
    try:
        if spec.launcher == "slurm":
            from fedsim.sweep_slurm import run_slurm

            run_slurm(sweep_dir, spec, todo, on_start, on_done)
        elif spec.jobs == 1 and not any(mpi for _, mpi in todo):
            for pid, _ in todo:
                on_start(pid)
                on_done(pid, outcome := run_inprocess(sweep_dir, pid))
                if outcome.status == "interrupted":
                    if outcome.signal == signal.SIGTERM:  # the run's own handler took it
                        _TERMINATED.append(True)
                    raise KeyboardInterrupt
        else:
            LocalPool(sweep_dir, spec.jobs, spec.mpiexec, spec.ranks).run(todo, on_start, on_done)
    except KeyboardInterrupt:
        print("sweep interrupted: rerun the same command to continue", file=sys.stderr)
        return 143 if _TERMINATED else 130
    return 0


def _report(sweep_dir: str, index: Index, ids: list[str], skipped: int) -> None:
    entries = [index.get(pid) for pid in ids]
    count = {s: sum(e["status"] == s for e in entries)
             for s in ("ok", "failed", "interrupted", "submitted", "running", "pending")}
    parts = [f"{n} {s}" for s, n in count.items() if n]
    print(f"sweep {sweep_dir}: {len(ids)} points: {', '.join(parts)} "
          f"({skipped} had finished before)", file=sys.stderr)
    for e in entries:
        if e["status"] == "failed":
            print(f"  failed {e['id']}: {e.get('error')} (log: {sweep_dir}/{POINTS}/{e['id']}.log)",
                  file=sys.stderr)
    if count["ok"] < len(ids):
        print("rerun the same command to run the unfinished points again", file=sys.stderr)
