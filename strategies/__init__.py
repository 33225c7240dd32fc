"""Federated and decentralized strategies, registered by name (scenario `strategy.name`).

Every module in this package registers its factories with ``@STRATEGIES.register(name)``;
modules are discovered automatically, so adding a strategy means adding one file.
User strategies load by dotted path (``strategy: {name: "pkg.module:factory"}``) or from
the entry-point group ``fedsim.strategies`` of an installed package.
"""

from __future__ import annotations

from fedsim.registry import Registry

STRATEGIES = Registry("strategies", builtins=("strategies._all",), reserved=("runtime",))


__all__ = ["STRATEGIES"]
