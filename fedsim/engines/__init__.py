"""Engines: how a scenario is executed. Registered by name (scenario `engine.kind`).

An engine factory takes its scenario options as typed keyword arguments and returns an
object with ``run(setup, on_eval, progress) -> list[dict]``. Engine modules are imported when
the registry is first used, so they must import heavy dependencies (mpi4py, flwr) lazily,
inside ``run``: ``fedsim run`` on the default engine never pays for them.
"""

from fedsim.registry import Registry

ENGINES = Registry("engines", builtins=("fedsim.engines.multiplex", "fedsim.engines.mpi",
                                       "fedsim.engines.flower"))

__all__ = ["ENGINES"]
