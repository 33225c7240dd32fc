"""Engines: how a scenario is executed. Registered by name (scenario `engine.kind`).

An engine factory takes its scenario options as typed keyword arguments and returns an
object with ``run(setup, run_dir_writer) -> list[dict]``.
"""

from fedsim.registry import Registry

ENGINES = Registry("engines", builtins=("fedsim.engines.multiplex", "fedsim.engines.optional"))

__all__ = ["ENGINES"]
