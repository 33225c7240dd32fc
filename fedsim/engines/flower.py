"""Flower engine: the scenario's strategy runs as a real Flower app (ServerApp + ClientApp).

The ServerApp drives `fedsim.flower.adapter.FlowerAdapter` (a `flwr.serverapp.strategy.Strategy`)
with Flower's own `Strategy.start` (or, for `strategy: {name: flower, class: ...}`, the
scenario's own Flower strategy object, `fedsim.flower.driver`); every client is a Flower node
running the fedsim ClientApp on its own partition. Runtimes:
  inprocess  fedsim's Ray-free `InProcessGrid` (deterministic, fast; default): the nodes that
             get a message in one push train as one stacked computation (`multiplex`),
  ray        Flower's simulation, `flwr.simulation.run_simulation` (`client_resources` passed on:
             fractional `num_gpus` is Flower's way of sharing a GPU between clients),
  mpi        `MpiGrid`: nodes spread over MPI ranks (`mpiexec -n K fedsim run ...`), each rank
             multiplexing its nodes.
flwr is imported only inside `run`: the registry imports this module whenever it loads.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedsim.engines import ENGINES
from fedsim.types import OnEval, Progress


class ClientResources(BaseModel):
    """Resources Flower's Ray backend reserves per ClientApp (concurrency = CPUs / num_cpus)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_cpus: Annotated[int, Field(ge=1)] = 1
    num_gpus: Annotated[float, Field(ge=0)] = 0.0


class FlowerEngine:
    """Runs a built scenario as a Flower app on one of the runtimes (module docstring)."""

    name = "flower"

    def __init__(self, runtime: str, client_resources: ClientResources, timeout_s: float,
                 threads: int | None, verbose: bool, chunk_size: int | None = None,
                 memory_mb: int = 2048, multiplex: bool = True) -> None:
        self.runtime, self.resources, self.timeout = runtime, client_resources, timeout_s
        self.threads, self.verbose = threads, verbose
        self.chunk_size, self.memory_mb, self.multiplex = chunk_size, memory_mb, multiplex
        self.is_root = True
        self.comm: Any = None
        self.adapter: Any = None
        if runtime == "mpi":
            from mpi4py import MPI

            self.comm = MPI.COMM_WORLD
            self.is_root = self.comm.Get_rank() == 0

    def prepare(self, setup: Any) -> None:
        """Place the data on the device (shared by the in-process nodes and the server's
        evaluation), as the multiplex engine's `prepare` does: set-up, not round time."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        if self.runtime != "ray":
            setup.problem()

    def run(self, setup: Any, on_eval: OnEval, progress: Progress | None = None,
            control: Any = None) -> list[dict[str, Any]]:
        import torch

        from fedsim.flower import client, grid, server

        if self.threads:
            torch.set_num_threads(self.threads)
        control = self._control(setup, control)
        text = client.scenario_text(setup.scenario)
        client.register_setup(text, setup)
        app = client.make_client_app(threads=self.threads or self.resources.num_cpus
                                     if self.runtime == "ray" else self.threads,
                                     chunk_size=self.chunk_size, memory_mb=self.memory_mb)
        n, seed = setup.num_clients, setup.scenario.seed
        flwr_log = logging.getLogger("flwr")
        level = flwr_log.level
        flwr_log.setLevel(logging.INFO if self.verbose else logging.WARNING)
        try:
            if self.runtime == "mpi" and not self.is_root:
                grid.serve_mpi(app, n, self.comm, seed=seed, multiplex=self.multiplex)
                return []
            done: list = []
            server_app = server.make_server_app(setup, text, done=done, on_eval=on_eval,
                                                progress=progress, timeout=self.timeout,
                                                control=control)
            if self.runtime == "ray":
                from flwr.simulation import run_simulation

                run_simulation(server_app, app, n,
                               backend_config={"client_resources": self.resources.model_dump(),
                                               "init_args": {"logging_level": "ERROR"}})
            else:
                g = (grid.MpiGrid(app, n, self.comm, seed=seed, multiplex=self.multiplex)
                     if self.runtime == "mpi"
                     else grid.InProcessGrid(app, n, seed=seed, multiplex=self.multiplex))
                try:
                    grid.run_server_app(server_app, g)
                finally:
                    if isinstance(g, grid.MpiGrid):
                        g.shutdown()
            if not done:
                raise RuntimeError("the Flower ServerApp did not finish (see the Flower log)")
            self.adapter = done[0]
            return self.adapter.history
        finally:
            flwr_log.setLevel(level)

    def _control(self, setup: Any, control: Any) -> Any:
        """Checkpoints on fedsim's grids (in-process, MPI) for fedsim strategies; none on Ray
        or for Flower strategy objects, and resuming those is bad input."""
        from fedsim.errors import ConfigError

        supported = self.runtime != "ray" and setup.scenario.strategy.name != "flower"
        if control is not None and control.resume is not None and not supported:
            raise ConfigError("resume needs the in-process or MPI runtime and a fedsim strategy "
                              "(Flower strategy objects and Ray workers keep state fedsim cannot "
                              "checkpoint)", key="engine.runtime", value=self.runtime,
                              allowed="inprocess, mpi")
        return control if supported else None

    def summary_extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {"flower_runtime": self.runtime}
        if self.adapter is not None:
            out["flower_bytes_up"], out["flower_bytes_down"] = self.adapter.wire[1], self.adapter.wire[0]
            out["flower_join_s"] = round(self.adapter.join_s, 4)
            out["sim"] = self.adapter.clock.summary()
            if self.adapter.history:  # first round to last evaluation, as the multiplex engine's
                out["wall_s"] = self.adapter.history[-1]["wall_s"]
        return out


@ENGINES.register("flower")
def flower(*, runtime: Literal["inprocess", "ray", "mpi"] = "inprocess",
           client_resources: ClientResources = ClientResources(),
           timeout_s: Annotated[float, Field(gt=0)] = 3600.0,
           threads: Annotated[int, Field(gt=0)] | None = None,
           verbose: bool = False, multiplex: bool = True,
           chunk_size: Annotated[int, Field(gt=0)] | None = None,
           memory_mb: Annotated[int, Field(gt=0)] = 2048) -> FlowerEngine:
    """The strategy as a real Flower app (ServerApp + ClientApp) on Flower's runtimes.

    Args:
      runtime: "inprocess" (fedsim's Ray-free deterministic Grid), "ray" (Flower's
        `run_simulation`) or "mpi" (nodes spread over `mpiexec` ranks).
      client_resources: {num_cpus, num_gpus} per ClientApp for the Ray backend.
      timeout_s: seconds to wait for node replies and for nodes to register.
      threads: torch intra-op threads (ray: defaults to client_resources.num_cpus per actor).
      verbose: show Flower's INFO log (round-by-round).
      multiplex: on fedsim's grids (in-process, MPI), train the nodes that get a message in
        one push as one stacked computation (False: one ClientApp call per message, m = 1).
      chunk_size: nodes per stacked computation when multiplexing; None picks it from
        `memory_mb`, as the multiplex engine does.
      memory_mb: memory bound for one chunk's working set when chunk_size is None.
    """
    return FlowerEngine(runtime, client_resources, timeout_s, threads, verbose, chunk_size,
                        memory_mb, multiplex)
