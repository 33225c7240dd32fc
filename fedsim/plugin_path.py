"""Dotted-path plug-ins (``pkg.module:factory``): imported, then checked before any call.

Importing a dotted path runs that module's code, from the installed packages or the working
directory (as Hydra's ``_target_`` does): only name modules you trust. What the path names is
never called until it is checked against the plug-in contract of its kind (`CONTRACTS`): a
class that makes the contract type, or a Python function annotated to return it. A builtin
(``os:system``), an unannotated function or one returning something else is a ConfigError, so
`fedsim validate` calls no unchecked plug-in code.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import typing
from collections.abc import Callable
from typing import Any

from fedsim.errors import ConfigError

# kind -> "module:Type" of what its plug-ins make: a dotted path must name a subclass of it or a
# Python function annotated to return it (checked before anything is called)
CONTRACTS = {"strategies": "fedsim.types:Strategy", "models": "torch.nn:Module",
             "datasets": "fedsim.data:Dataset", "topologies": "topologies.base:Topology",
             "partitions": "builtins:list", "participation": "fedsim.participation:Participation",
             "compressors": "strategies.compress:Transform", "optimizers": "strategies.local:Optimizer",
             "work": "fedsim.work:LocalWork", "engines": "fedsim.types:Engine"}


def import_path(path: str, noun: str, key: str, kind: str = "") -> Callable[..., Any]:
    """The object a dotted path names, imported (module code runs, as Hydra's `_target_`) and
    checked against the plug-in contract of `kind` (`CONTRACTS`) without calling it."""
    mod_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        try:
            obj: Any = importlib.import_module(mod_name)
        except ModuleNotFoundError:
            # like `python -m`: modules next to where the user runs fedsim are importable
            if os.getcwd() in sys.path:
                raise
            sys.path.append(os.getcwd())
            obj = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"cannot import {noun} from dotted path: {exc}", key=key, value=path,
                          allowed="'pkg.module:factory' importable from the current environment") from None
    except Exception as exc:  # noqa: BLE001 - the module itself fails: a syntax error, a raise
        raise ConfigError(f"importing the {noun} module failed: {type(exc).__name__}: {exc}",
                          key=key, value=path, allowed="a module that imports cleanly") from None
    _check_contract(obj, kind, path, noun, key)
    return obj


def _contract(kind: str) -> type | None:
    spec = CONTRACTS.get(kind)
    if spec is None:
        return None
    mod, _, name = spec.partition(":")
    found: type = getattr(importlib.import_module(mod), name)
    return found


def _makes(t: Any, want: type) -> bool:
    """Whether type `t` is `want`, a subclass, a parametrised `want` (``list[np.ndarray]``) or,
    for a Protocol, a class with all of its methods."""
    if t is want or typing.get_origin(t) is want:
        return True
    if not inspect.isclass(t):
        return False
    if getattr(want, "_is_protocol", False):
        methods = [k for k, v in vars(want).items() if callable(v) and not k.startswith("_")]
        return all(callable(getattr(t, k, None)) for k in methods)
    return issubclass(t, want)


def _check_contract(obj: Any, kind: str, path: str, noun: str, key: str) -> None:
    """ConfigError unless `obj` is a class making `kind`'s contract type or a Python function
    whose return annotation is that type (builtins such as ``os:system`` never qualify)."""
    want = _contract(kind)
    label = f"{want.__module__}.{want.__qualname__}" if want is not None else "a plug-in"
    allowed = (f"a subclass of {label}, or a Python function annotated '-> {want.__qualname__}'"
               if want is not None else "a Python function or class")
    if inspect.isclass(obj):
        if want is None or _makes(obj, want):
            return
        raise ConfigError(f"dotted path names a class that is not a {noun}", key=key, value=path,
                          allowed=allowed)
    if not inspect.isfunction(obj):
        raise ConfigError(f"dotted path does not name a {noun} factory (a Python function or class)",
                          key=key, value=path, allowed=allowed)
    if want is None:
        return
    try:
        ret = typing.get_type_hints(obj).get("return")
    except Exception:  # noqa: BLE001 - an annotation that does not resolve
        ret = None
    if ret is None or not _makes(ret, want):
        raise ConfigError(f"dotted-path {noun} factory is not annotated to return {label}", key=key,
                          value=path, allowed=allowed)
