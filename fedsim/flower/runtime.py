"""Run any (unmodified) Flower app on fedsim's runtimes: `fedsim flower-run SERVER CLIENT`.

    from fedsim.flower.runtime import run_app
    info = run_app(server_app, client_app, num_nodes=10, runtime="inprocess", seed=0)

- inprocess: `InProcessGrid` (Ray-free, deterministic, counts bytes; see `fedsim.flower.grid`).
- mpi: `MpiGrid` across `mpiexec` ranks (call `run_app` on every rank).
- ray: Flower's own simulation (`run_simulation`), for comparison; not reproducible.
The nodes get `node_config = {"partition-id": i, "num-partitions": N}` as in Flower's simulation.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from fedsim.errors import ConfigError

RUNTIMES = ("inprocess", "mpi", "ray")


@dataclass
class RunInfo:
    """What a run of a Flower app reports (bytes: `count_bytes()` of every message's records)."""

    runtime: str
    num_nodes: int
    wall_s: float
    messages: int | None = None
    bytes_down: int | None = None
    bytes_up: int | None = None
    is_root: bool = True


def load_app(spec: str, kind: str, app_dir: str | None = None) -> Any:
    """Import `module:attribute` (a ServerApp or ClientApp), as Flower's `[tool.flwr.app.components]`."""
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise ConfigError(f"{kind} must look like 'package.module:attribute'", value=spec)
    path = os.path.abspath(app_dir or os.getcwd())
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        obj: Any = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load {kind}: {exc}", value=spec) from None
    return obj


def run_app(server_app: Any, client_app: Any, num_nodes: int, *, runtime: str = "inprocess",
            seed: int = 0, run_config: dict | None = None,
            client_resources: dict | None = None) -> RunInfo:
    """Run a Flower ServerApp against `num_nodes` nodes running `client_app`.

    `seed` seeds the ServerApp's global RNGs (`random`, numpy, torch; Flower's samplers use
    `random`) and the nodes' (per node and message, see `fedsim.flower.grid`). `run_config` is
    the `context.run_config` of the ServerApp and of every node.
    """
    from fedsim.flower import grid as g

    if runtime not in RUNTIMES:
        raise ConfigError("unknown Flower runtime", value=runtime, allowed=", ".join(RUNTIMES))
    t0 = time.perf_counter()
    if runtime == "ray":
        _run_ray(server_app, client_app, num_nodes, run_config, client_resources)
        return RunInfo(runtime, num_nodes, time.perf_counter() - t0)
    comm = None
    if runtime == "mpi":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        if comm.Get_rank() > 0:
            g.serve_mpi(client_app, num_nodes, comm, seed=seed, run_config=run_config)
            return RunInfo(runtime, num_nodes, time.perf_counter() - t0, is_root=False)
        grid: Any = g.MpiGrid(client_app, num_nodes, comm, seed=seed, run_config=run_config)
    else:
        grid = g.InProcessGrid(client_app, num_nodes, seed=seed, run_config=run_config)
    g.seed_globals(seed)
    try:
        g.run_server_app(server_app, grid, run_config)
    finally:
        if comm is not None:
            grid.shutdown()
    return RunInfo(runtime, num_nodes, time.perf_counter() - t0, grid.messages,
                   grid.bytes_down, grid.bytes_up)


def _run_ray(server_app: Any, client_app: Any, num_nodes: int, run_config: dict | None,
             client_resources: dict | None) -> None:
    """Flower's simulation. With a run_config, the nodes read it from a generated app directory
    (Flower's `run_simulation` takes none; `flwr run` does the same through `_run_simulation`)."""
    backend = {"client_resources": client_resources or {"num_cpus": 1, "num_gpus": 0.0}}
    if not run_config:
        from flwr.simulation import run_simulation

        run_simulation(server_app, client_app, num_nodes, backend_config=backend)
        return
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.telemetry import EventType

    from fedsim.flower.identity import set_task_identity

    with tempfile.TemporaryDirectory() as app_dir:
        with open(os.path.join(app_dir, "pyproject.toml"), "w") as fh:
            fh.write(_pyproject_for(run_config))
        run = Run.create_empty(run_id=int(time.time_ns() % (1 << 62)))
        run.primary_task_id, run.federation_id = 1, NOOP_FEDERATION_ID
        set_task_identity(run.run_id)
        context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(),
                          run_config=dict(run_config))
        _run_simulation(num_supernodes=num_nodes, client_app=client_app, server_app=server_app,
                        backend_config=backend, app_dir=app_dir, run=run,
                        server_app_context=context,
                        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE)


def _pyproject_for(run_config: dict) -> str:
    """A minimal Flower app pyproject whose `[tool.flwr.app.config]` is `run_config`."""
    import json

    lines = ['[project]', 'name = "flower-run"', 'version = "0.0.0"', '',
             '[tool.flwr.app.config]']
    lines += [f'"{k}" = {json.dumps(v)}' for k, v in run_config.items()]
    return "\n".join(lines) + "\n"


def parse_run_config(items: list[str] | None) -> dict[str, Any]:
    """`key=value` pairs (values as TOML, like `flwr run --run-config`)."""
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args(items or None))
    except Exception as exc:  # noqa: BLE001 - tomli errors, bad pairs
        raise ConfigError(f"bad --run-config: {exc}", value=" ".join(items or [])) from None
