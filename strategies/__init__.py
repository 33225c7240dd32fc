"""Federated and decentralized strategies and compressors, registered by name.

Every module in this package registers its factories with ``@STRATEGIES.register(name)``
(scenario `strategy.name`), ``@COMPRESSORS.register(name)`` (a `compressor` mapping) or
``@OPTIMIZERS.register(name)`` (a local optimizer mapping such as CO2's `inner`);
modules are discovered automatically, so adding a strategy means adding one file. User
strategies load by dotted path (``strategy: {name: "pkg.module:factory"}``) or from the
entry-point groups ``fedsim.strategies`` / ``fedsim.compressors`` of an installed package.
"""

from __future__ import annotations

from fedsim.registry import Registry

STRATEGIES = Registry("strategies", builtins=("strategies._all",), reserved=("runtime",))
COMPRESSORS = Registry("compressors", builtins=("strategies.compress", "strategies.feedback"),
                       self_describing=True)
OPTIMIZERS = Registry("optimizers", builtins=("strategies.local",), self_describing=True)


__all__ = ["STRATEGIES", "COMPRESSORS", "OPTIMIZERS"]
