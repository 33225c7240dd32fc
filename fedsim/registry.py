"""Registries of plug-ins by name: strategies, topologies, datasets, models, ...

A plug-in is a plain factory function with typed keyword arguments. The registry looks it up
by name, by dotted path (``"pkg.module:factory"``) or through the entry-point group
``fedsim.<kind>`` of installed packages, validates the keyword arguments from a scenario
against the factory's signature (pydantic), and calls it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from importlib import metadata
from typing import Any, Callable, Iterable

from fedsim.errors import ConfigError


# kind -> (singular noun, the scenario key that chooses the plug-in)
_NOUNS = {"strategies": ("strategy", "name"), "datasets": ("dataset", "dataset"),
          "compressors": ("compressor", "name"), "topologies": ("topology", "kind"),
          "partitions": ("partition", "kind"), "models": ("model", "kind"),
          "participation": ("participation pattern", "kind"), "engines": ("engine", "kind")}


class Registry:
    """Name -> factory map for one kind of plug-in.

    Args:
      kind: plural noun used in messages and for the entry-point group (``fedsim.<kind>``).
      builtins: modules imported on first use; they register the built-in factories.
      reserved: keyword arguments that the runtime passes itself (never from a scenario).
    """

    def __init__(self, kind: str, builtins: Iterable[str] = (), reserved: Iterable[str] = ()):
        self.kind = kind
        self._builtins = tuple(builtins)
        self._reserved = frozenset(reserved)
        self._factories: dict[str, Callable[..., Any]] = {}
        self._loaded = False
        self.noun, self.key = _NOUNS.get(kind, (kind.rstrip("s"), "kind"))

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@REGISTRY.register("fedavg")`` on a factory function."""
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._factories and self._factories[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._factories[name] = fn
            return fn
        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for mod in self._builtins:
            importlib.import_module(mod)
        try:
            eps = metadata.entry_points(group=f"fedsim.{self.kind}")
        except Exception:  # pragma: no cover - broken metadata of some other package
            eps = ()
        for ep in eps:
            self._factories.setdefault(ep.name, _LazyEntryPoint(ep))

    def names(self) -> list[str]:
        self._load()
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., Any]:
        """Factory by registered name or dotted path; ConfigError if unknown."""
        self._load()
        if name in self._factories:
            fn = self._factories[name]
            return fn.load() if isinstance(fn, _LazyEntryPoint) else fn
        if ":" in name or "." in name:
            return _import_path(name, self.noun, self.key)
        raise ConfigError(f"unknown {self.noun}", key=self.key, value=name,
                          allowed=", ".join(self.names()) + ", or a dotted path 'pkg.module:factory'")

    def describe(self, name: str) -> str:
        """First line of the factory's docstring."""
        doc = inspect.getdoc(self.get(name)) or ""
        return doc.splitlines()[0] if doc else ""

    def params(self, name: str) -> dict[str, inspect.Parameter]:
        """The scenario-settable keyword parameters of a factory (reserved ones excluded)."""
        sig = inspect.signature(self.get(name))
        return {k: p for k, p in sig.parameters.items()
                if k not in self._reserved and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    def validate(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        """Validate scenario params against the factory signature; return them with defaults filled."""
        return validate_kwargs(self.get(name), params, reserved=self._reserved)

    def build(self, name: str, params: dict[str, Any], **runtime: Any) -> Any:
        """Validate `params`, then call the factory with them plus the runtime keyword arguments."""
        kwargs = self.validate(name, params)
        return self.get(name)(**kwargs, **runtime)


class _LazyEntryPoint:
    def __init__(self, ep: Any) -> None:
        self.ep = ep

    def load(self) -> Callable[..., Any]:
        return self.ep.load()


def _import_path(path: str, noun: str, key: str) -> Callable[..., Any]:
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
    if not callable(obj):
        raise ConfigError(f"dotted path does not name a callable {noun}", key=key, value=path)
    return obj


_MODEL_CACHE: dict[Callable[..., Any], Any] = {}


def _signature_model(fn: Callable[..., Any], reserved: frozenset[str]) -> Any:
    """A pydantic model with one field per keyword parameter of `fn` (cached)."""
    if fn in _MODEL_CACHE:
        return _MODEL_CACHE[fn]
    import typing

    from pydantic import ConfigDict, create_model

    hints = typing.get_type_hints(fn, include_extras=True)
    fields: dict[str, Any] = {}
    for k, p in inspect.signature(fn).parameters.items():
        if k in reserved or p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue
        ann = hints.get(k, Any)
        fields[k] = (ann, ... if p.default is p.empty else p.default)
    model = create_model(f"{getattr(fn, '__name__', 'factory')}_params",
                         __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True,
                                               strict=False), **fields)
    _MODEL_CACHE[fn] = model
    return model


def validate_kwargs(fn: Callable[..., Any], params: dict[str, Any],
                    reserved: Iterable[str] = ()) -> dict[str, Any]:
    """Check `params` against `fn`'s annotated signature; ConfigError names the first bad key."""
    from pydantic import ValidationError

    model = _signature_model(fn, frozenset(reserved))
    try:
        obj = model(**params)
    except ValidationError as exc:
        raise pydantic_to_config_error(exc, sorted(model.model_fields)) from None
    return {k: getattr(obj, k) for k in model.model_fields}


_TYPE_TAGS = {"float", "int", "str", "bool", "list", "dict", "tuple", "none", "bytes", "any"}


def _is_type_tag(part: Any) -> bool:
    """Pydantic puts union-member names (``float``, ``list[float]``, ``constrained-float``) in
    error locations; they are not keys of the user's file."""
    if isinstance(part, int):
        return False
    text = str(part)
    return text.lower() in _TYPE_TAGS or "[" in text or "-" in text


def pydantic_to_config_error(exc: Any, keys: list[str] | None = None) -> ConfigError:
    """First error of a pydantic ValidationError as a ConfigError with a dotted key path.

    `keys` lists the keys allowed at the top level (named in the message for unknown keys).
    """
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if not _is_type_tag(p)]
    key = ".".join(loc) or None
    typ = err.get("type", "")
    if typ == "extra_forbidden":
        allowed = ", ".join(keys) if keys is not None and len(loc) == 1 else None
        return ConfigError("unknown key", key=key, allowed=allowed or "no other keys here")
    if typ == "missing":
        return ConfigError("required key is missing", key=key)
    value = err.get("input", ...)
    msg = err.get("msg", "invalid value")
    ctx = err.get("ctx") or {}
    allowed = ctx.get("expected") if isinstance(ctx, dict) else None
    return ConfigError(msg[0].lower() + msg[1:] if msg else "invalid value", key=key,
                       value=value, allowed=allowed)
