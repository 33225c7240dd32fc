"""``--launcher slurm``: the points of a sweep as a Slurm job array, submitted through submitit.

Each array task runs one point in-process (`run_point_task`: the same ``fedsim run`` command line
as the local launcher). ``sweep.submitit`` holds submitit's executor parameters: ``cluster``
(``slurm``, default; ``local`` or ``debug`` run the same jobs on this machine, for trying a sweep
out), the generic ``timeout_min`` (default 60), ``mem_gb``, ``cpus_per_task``, ``gpus_per_node``,
``nodes`` and the ``slurm_*`` ones (``slurm_partition``, ``slurm_account``, ``slurm_qos``,
``slurm_srun_args``, ...). ``jobs`` caps the array's parallelism (``slurm_array_parallelism``).

MPI inside a point: a point whose ``engine.kind`` is ``mpi`` becomes a job of ``ranks`` tasks
(``tasks_per_node = ranks``, or set ``nodes``); submitit starts every task with ``srun``, so the
tasks form one MPI world (mpi4py built against the cluster's MPI; add
``slurm_srun_args: ["--mpi=pmix"]`` where the site needs it), every rank runs the point and rank 0
writes its run folder, exactly like ``srun -n R fedsim run ... --engine mpi``.

The driver waits for the array and records each point as it ends. If it is stopped, queued jobs go
on running: wait for them (``squeue``) before rerunning the sweep, or cancel them (``scancel``),
since a rerun submits every point that has not finished again.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from fedsim.errors import ConfigError
from fedsim.sweep import SweepSpec
from fedsim.sweep_run import Outcome, launch_args, run_inprocess


def _executor(spec: SweepSpec, folder: str, ranks: int) -> Any:
    """A submitit AutoExecutor with the sweep's parameters (ConfigError naming a bad one)."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("the slurm launcher needs submitit: pip install 'fedsim-lab[slurm]'",
                          key="sweep.launcher", value="slurm") from None
    params = dict(spec.submitit)
    cluster = params.pop("cluster", "slurm")
    params.setdefault("timeout_min", 60)
    params.setdefault("name", "fedsim-sweep")
    params["slurm_array_parallelism"] = params.get("slurm_array_parallelism", spec.jobs)
    if ranks > 1 and cluster != "slurm":
        raise ConfigError("an MPI point needs real Slurm tasks (srun); try it with the local "
                          "launcher", key="sweep.submitit.cluster", value=cluster, allowed="slurm")
    if ranks > 1 and "nodes" not in params:
        params["tasks_per_node"] = ranks
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster=cluster)
    except (RuntimeError, ValueError) as exc:  # e.g. no srun here: not a Slurm machine
        raise ConfigError(f"submitit cannot use this cluster: {str(exc).splitlines()[0]}",
                          key="sweep.submitit.cluster", value=cluster,
                          allowed="slurm (on a Slurm login node), local or debug (this machine)"
                          ) from None
    try:
        ex.update_parameters(**params)
    except (NameError, ValueError, TypeError, AssertionError) as exc:
        raise ConfigError(f"submitit rejects the parameters: {str(exc).splitlines()[0]}",
                          key="sweep.submitit", value=spec.submitit) from None
    return ex


def check_params(spec: SweepSpec, mpi: bool) -> None:
    """Fail before anything runs when submitit or its parameters are wrong."""
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in {1, spec.ranks if mpi else 1}:
            _executor(spec, tmp, ranks)


def run_point_task(sweep_dir: str, pid: str) -> dict[str, Any] | None:
    """What one array task runs. Under MPI every rank runs it; rank 0 reports the outcome."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus:
        os.environ.setdefault("OMP_NUM_THREADS", cpus)
    if int(os.environ.get("SLURM_PROCID", "0")) > 0:
        from fedsim.cli import main

        main(launch_args(sweep_dir, pid))
        return None
    return asdict(run_inprocess(sweep_dir, pid))


def _outcome(job: Any) -> Outcome:
    try:
        result = job.results()[0]
    except Exception as exc:  # noqa: BLE001 - the job itself failed: submitit's error names its log
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        return Outcome("failed", error=f"job {job.job_id}: {lines[-1] if lines else exc}")
    return Outcome(**result) if result else Outcome("failed", error="no result from rank 0")


def run_slurm(sweep_dir: str, spec: SweepSpec, todo: list[tuple[str, bool]],
              on_start: Callable[..., None], on_done: Callable[[str, Outcome], None]) -> None:
    """Submit the `todo` points (one array per rank count) and wait for every job to end."""
    folder = os.path.join(sweep_dir, ".submitit", "%j")
    jobs: dict[str, Any] = {}
    for ranks in sorted({spec.ranks if mpi else 1 for _, mpi in todo}):
        ids = [pid for pid, mpi in todo if (spec.ranks if mpi else 1) == ranks]
        ex = _executor(spec, folder, ranks)
        for pid, job in zip(ids, ex.map_array(run_point_task, [sweep_dir] * len(ids), ids), strict=True):
            jobs[pid] = job
            on_start(pid, status="submitted", job_id=str(job.job_id))
    poll = 15.0 if spec.submitit.get("cluster", "slurm") == "slurm" else 0.5
    try:
        while jobs:
            for pid, job in list(jobs.items()):
                if job.done():
                    on_done(pid, _outcome(job))
                    del jobs[pid]
            if jobs:
                time.sleep(poll)
    except KeyboardInterrupt:
        arrays = " ".join(sorted({str(j.job_id).split("_")[0] for j in jobs.values()}))
        print(f"the submitted jobs go on running; `scancel {arrays}` stops them", file=sys.stderr)
        raise
