"""Imports every public strategy module of the package (the registry's built-ins)."""

import importlib
import pkgutil

import strategies

for _mod in pkgutil.iter_modules(strategies.__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"strategies.{_mod.name}")
