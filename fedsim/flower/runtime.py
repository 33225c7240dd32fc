"""Run any (unmodified) Flower app on fedsim's runtimes: `fedsim flower-run SERVER CLIENT`.

    from fedsim.flower.runtime import run_app
    info = run_app(server_app, client_app, num_nodes=10, runtime="inprocess", seed=0)

- inprocess: `InProcessGrid` (Ray-free, deterministic, counts bytes; see `fedsim.flower.grid`).
- mpi: `MpiGrid` across `mpiexec` ranks (call `run_app` on every rank).
- ray: Flower's own simulation (`flwr.simulation.run_simulation`, deprecated by Flower 1.42 in
  favour of `flwr run` but still its Python API), for comparison; not reproducible.
The nodes get `node_config = {"partition-id": i, "num-partitions": N}` as in Flower's simulation.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from flwr.clientapp import ClientApp

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
    if not os.path.isdir(path):
        raise ConfigError("app directory not found", key="--app-dir", value=app_dir,
                          allowed="a directory holding the app's modules")
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        obj: Any = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load {kind}: {exc}", value=spec) from None
    except Exception as exc:  # noqa: BLE001 - the app module itself raises or has a syntax error
        raise ConfigError(f"importing the {kind} module failed: {type(exc).__name__}: {exc}",
                          value=spec) from None
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
    """Flower's simulation (`flwr.simulation.run_simulation`). It takes no run_config, so with
    one the apps are wrapped (`with_run_config`) to see it in `context.run_config`. The caller's
    SIGINT / SIGTERM / SIGHUP handlers are put back afterwards (Ray's `init` replaces SIGTERM's)."""
    from flwr.simulation import run_simulation

    from fedsim.run import signals_restored

    backend = {"client_resources": client_resources or {"num_cpus": 1, "num_gpus": 0.0}}
    if run_config:
        server_app, client_app = with_run_config(server_app, client_app, run_config)
    with signals_restored():
        run_simulation(server_app, client_app, num_nodes, backend_config=backend)


def with_run_config(server_app: Any, client_app: Any, run_config: dict) -> tuple[Any, Any]:
    """A ServerApp and a ClientApp that run the given ones with `run_config` added to their
    Context's `run_config` (what `flwr run --run-config` does through the app's pyproject)."""
    from flwr.serverapp import ServerApp

    cfg = dict(run_config)
    server = ServerApp()

    @server.main()
    def main(grid: Any, context: Any) -> None:
        context.run_config = {**context.run_config, **cfg}
        server_app(grid=grid, context=context)

    return server, ConfiguredClientApp(client_app, cfg)


class ConfiguredClientApp(ClientApp):
    """A ClientApp that calls `app` with `run_config` merged into each node's Context."""

    def __init__(self, app: Any, run_config: dict) -> None:
        super().__init__()
        self.app, self.run_config = app, dict(run_config)

    def __call__(self, message: Any, context: Any) -> Any:
        context.run_config = {**context.run_config, **self.run_config}
        return self.app(message, context)


def parse_run_config(items: list[str] | None) -> dict[str, Any]:
    """`key=value` pairs (values as TOML, like `flwr run --run-config`)."""
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args(items or None))
    except Exception as exc:  # noqa: BLE001 - tomli errors, bad pairs
        raise ConfigError(f"bad --run-config: {exc}", value=" ".join(items or [])) from None
