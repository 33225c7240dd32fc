"""Registries of plug-ins by name: strategies, topologies, datasets, models, ...

A plug-in is a plain factory function with typed keyword arguments. The registry looks it up
by name, by dotted path (``"pkg.module:factory"``) or through the entry-point group
``fedsim.<kind>`` of installed packages, validates the keyword arguments from a scenario
against the factory's signature (pydantic), and calls it. The registry owns three more
conventions, so plug-in code holds no config code:

* runtime arguments (``reserved``: e.g. a strategy's ``runtime``, a model's ``input_shape``)
  are passed by `build` to the factories that declare them, and only to those;
* a ``ValueError`` raised by a factory for an impossible combination of arguments becomes a
  ConfigError (exit 2); a message that starts with ``"<param>: "`` names that key;
* parameters annotated with a plug-in type (`fedsim.types.Compressor`, or a list of them)
  take ``{name: ..., <params>}`` mappings, validated recursively by that type's registry and
  built into objects; registries created with ``self_describing=True`` attach the mapping
  (``spec``) to what their factories return, so a resolved scenario can be written back;
* parameters annotated with *variants* (frozen dataclasses whose ``kind`` field is a one-value
  ``Literal``, alone or in a union, possibly with plain types such as a float) take
  ``{kind: ..., <params>}`` mappings, or the bare ``kind`` string for its defaults: one key
  with its own parameters (``penalty: {kind: const, value: 2.0}``, ``lr: theory``), so a
  parameter of another variant cannot be written and silently ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import Any

from fedsim.errors import ConfigError

# kind -> (singular noun, the scenario key that chooses the plug-in)
_NOUNS = {"strategies": ("strategy", "name"), "datasets": ("dataset", "dataset"),
          "compressors": ("compressor", "name"), "optimizers": ("optimizer", "name"),
          "work": ("local work model", "kind"), "aggregators": ("aggregator", "name"),
          "attacks": ("attack", "kind"),
          "topologies": ("topology", "kind"),
          "partitions": ("partition", "kind"), "models": ("model", "kind"),
          "participation": ("participation pattern", "kind"), "engines": ("engine", "kind")}


class Registry:
    """Name -> factory map for one kind of plug-in.

    Args:
      kind: plural noun used in messages and for the entry-point group (``fedsim.<kind>``).
      builtins: modules imported on first use; they register the built-in factories.
      reserved: keyword arguments that the runtime passes itself (never from a scenario).
      self_describing: factories return NamedTuples with a ``spec`` field, filled with
        ``{"name": <registered name>, **arguments}`` on every call (compressors).
    """

    def __init__(self, kind: str, builtins: Iterable[str] = (), reserved: Iterable[str] = (),
                 self_describing: bool = False):
        self.kind = kind
        self._builtins = tuple(builtins)
        self._reserved = frozenset(reserved)
        self._factories: dict[str, Callable[..., Any]] = {}
        self._loaded = False
        self.self_describing = self_describing
        self.noun, self.key = _NOUNS.get(kind, (kind.rstrip("s"), "kind"))

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@REGISTRY.register("fedavg")`` on a factory function."""
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._factories and self._factories[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            target = _describing(name, fn) if self.self_describing else fn
            self._factories[name] = target
            return target
        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for mod in self._builtins:
            importlib.import_module(mod)
        try:
            eps = list(metadata.entry_points(group=f"fedsim.{self.kind}"))
        except Exception:  # noqa: BLE001 - pragma: no cover - broken metadata of some other package
            eps = []
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
            from fedsim.plugin_path import import_path

            return import_path(name, self.noun, self.key, self.kind)
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
        """Validate `params`, then call the factory with them plus the runtime arguments it declares.

        A ValueError from the factory becomes a ConfigError (key: the parameter its message
        names as ``"<param>: ..."``, else none).
        """
        kwargs = self.validate(name, params)
        fn = self.get(name)
        accepted = inspect.signature(fn).parameters
        extra = {k: v for k, v in runtime.items() if k in accepted}
        try:
            return fn(**kwargs, **extra)
        except ValueError as exc:
            raise _factory_error(exc, kwargs) from None


def _describing(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` whose result carries ``spec = {"name": name, **its arguments with defaults}``."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def factory(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return fn(*args, **kwargs)._replace(spec={"name": name, **bound.arguments})
    return factory


def _factory_error(exc: ValueError, kwargs: Mapping[str, Any]) -> ConfigError:
    msg = str(exc)
    head, sep, rest = msg.partition(": ")
    if sep and head in kwargs:
        return ConfigError(rest, key=head, value=kwargs[head])
    return ConfigError(msg)


class _LazyEntryPoint:
    """An installed plug-in, imported when first used."""

    def __init__(self, ep: Any) -> None:
        self.ep = ep

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.load()(*args, **kwargs)

    def load(self) -> Callable[..., Any]:
        fn: Callable[..., Any] = self.ep.load()
        return fn


_MODEL_CACHE: dict[Callable[..., Any], Any] = {}


def nested_registry(kind: str) -> Registry:
    """The registry of plug-ins that appear as arguments of other plug-ins, by kind."""
    import strategies
    from fedsim.robust import AGGREGATORS

    return {"compressors": strategies.COMPRESSORS, "optimizers": strategies.OPTIMIZERS,
            "aggregators": AGGREGATORS}[kind]


def _nested_kind(ann: Any) -> tuple[str, bool] | None:
    """(kind, is_list) when `ann` is a plug-in type T (`fedsim.types.Compressor` or
    `LocalOptimizer`), T | None or list[T]."""
    from fedsim.types import Compressor, LocalOptimizer

    kinds = {Compressor: "compressors", LocalOptimizer: "optimizers"}
    if ann in kinds:
        return kinds[ann], False
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is list and args and args[0] in kinds:
        return kinds[args[0]], True
    members = [a for a in args if a is not type(None)]
    if len(members) == 1 and members[0] in kinds:
        return kinds[members[0]], False
    return None


def build_nested(kind: str, value: Any) -> Any:
    """A plug-in object from its ``{name: ..., <params>}`` mapping (objects pass unchanged).

    ConfigError keys are relative to the mapping ("ratio", "inner.k", "stages.1.levels").
    """
    reg = nested_registry(kind)
    if value is None or not isinstance(value, Mapping):
        if value is not None and getattr(value, "spec", None) is not None:
            return value
        raise ConfigError(f"a {reg.noun} is a mapping {{name: ..., <params>}}", value=value)
    name = value.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"a {reg.noun} needs a string 'name'", key="name", value=name,
                          allowed=", ".join(reg.names()))
    try:
        return reg.build(name, {k: v for k, v in value.items() if k != "name"})
    except ConfigError as err:
        raise (err.at(prefix="name") if err.key is None else err) from None


def _nested_field(kind: str, is_list: bool, field: str, optional: bool) -> Any:
    """A pydantic type validating a nested plug-in parameter into objects."""
    from pydantic import BeforeValidator

    def one(value: Any, where: str) -> Any:
        if value is None and optional:
            return None
        try:
            return build_nested(kind, value)
        except ConfigError as err:
            raise err.at(prefix=where) from None

    def check(value: Any) -> Any:
        if not is_list:
            return one(value, field)
        if not isinstance(value, (list, tuple)):
            raise ConfigError("expected a list", key=field, value=value)
        return [one(v, f"{field}.{j}") for j, v in enumerate(value)]
    return typing.Annotated[Any, BeforeValidator(check)]


def variant_tag(cls: Any) -> str | None:
    """The ``kind`` of a variant class: a dataclass whose ``kind`` field is a one-value Literal."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return None
    ann = typing.get_type_hints(cls).get("kind")
    args = typing.get_args(ann)
    if typing.get_origin(ann) is typing.Literal and len(args) == 1 and isinstance(args[0], str):
        return args[0]
    return None


def _variants(ann: Any) -> tuple[dict[str, type], list[Any], bool] | None:
    """({kind: class}, the other union members, optional) when `ann` has variant members."""
    union = typing.get_origin(ann) in (typing.Union, types.UnionType)
    tags: dict[str, type] = {}
    others: list[Any] = []
    optional = False
    for member in typing.get_args(ann) if union else (ann,):
        tag = variant_tag(member)
        if member is type(None):
            optional = True
        elif tag is None:
            others.append(member)
        else:
            tags[tag] = member
    return (tags, others, optional) if tags else None


def build_variant(tags: Mapping[str, type], value: Any) -> Any:
    """A variant object from ``{kind: ..., <params>}`` or a bare kind string (objects pass).

    ConfigError keys are relative to the mapping ("kind", "value").
    """
    if isinstance(value, tuple(tags.values())):
        return value
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, Mapping):
        raise ConfigError("expected a mapping {kind: ..., <params>} or a kind", value=value,
                          allowed=", ".join(tags))
    kind = value.get("kind")
    if not isinstance(kind, str) or kind not in tags:
        raise ConfigError("unknown kind" if "kind" in value else "a 'kind' is required", key="kind",
                          value=kind if "kind" in value else ..., allowed=", ".join(tags))
    cls = tags[kind]
    kwargs = validate_kwargs(cls, {k: v for k, v in value.items() if k != "kind"}, reserved=("kind",))
    return cls(kind=kind, **kwargs)


def _variant_field(tags: dict[str, type], others: list[Any], optional: bool, field: str) -> Any:
    """A pydantic type for a parameter whose values include variants (see `build_variant`)."""
    from pydantic import ValidationError, WrapValidator

    from fedsim.plugin_doc import type_text

    choices = ", ".join([*(type_text(o) for o in others), *tags, *(["null"] if optional else [])])

    def check(value: Any, handler: Callable[[Any], Any]) -> Any:
        if value is None and optional:
            return None
        named = isinstance(value, str) and value in tags
        if not others or named or isinstance(value, (Mapping, *tags.values())):
            try:
                return build_variant(tags, value)
            except ConfigError as err:
                raise err.at(prefix=field) from None
        try:
            return handler(value)
        except ValidationError as exc:
            msg = pydantic_to_config_error(exc).msg
            raise ConfigError(msg, key=field, value=value, allowed=choices) from None
    base: Any = functools.reduce(lambda a, b: a | b, others) if others else Any
    return typing.Annotated[base, WrapValidator(check)]


def _signature_model(fn: Callable[..., Any], reserved: frozenset[str]) -> Any:
    """A pydantic model with one field per keyword parameter of `fn` (cached)."""
    if fn in _MODEL_CACHE:
        return _MODEL_CACHE[fn]
    from pydantic import ConfigDict, create_model

    hints = typing.get_type_hints(fn, include_extras=True)
    fields: dict[str, Any] = {}
    for k, p in inspect.signature(fn).parameters.items():
        if k in reserved or p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue
        ann = hints.get(k, Any)
        nested = _nested_kind(ann)
        if nested is not None:
            ann = _nested_field(*nested, k, optional=type(None) in typing.get_args(ann))
        elif (variants := _variants(ann)) is not None:
            ann = _variant_field(*variants, k)
        else:
            ann = _number_guard(ann, k, p.default)
        fields[k] = (ann, ... if p.default is p.empty else p.default)
    model = create_model(f"{getattr(fn, '__name__', 'factory')}_params",
                         __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True,
                                               strict=False), **fields)
    _MODEL_CACHE[fn] = model
    return model


def _number_types(ann: Any) -> set[type]:
    """The plain types `ann` admits (Annotated and unions unwrapped): e.g. {int, NoneType}."""
    if typing.get_origin(ann) is typing.Annotated:
        return _number_types(typing.get_args(ann)[0])
    args = typing.get_args(ann)
    if args and typing.get_origin(ann) in (typing.Union, types.UnionType):
        return set().union(*(_number_types(a) for a in args))
    return {ann} if isinstance(ann, type) else {object}


def _number_guard(ann: Any, key: str, default: Any) -> Any:
    """`ann` that refuses what pydantic would silently coerce for a number: a bool where no bool
    is allowed (`local_steps: true` would be 1 step) and NaN, or inf unless the default is inf
    (`lr: .inf`)."""
    from pydantic import BeforeValidator

    types_ = _number_types(ann)
    if not types_ & {int, float} or types_ & {bool, object, str}:
        return ann
    inf_ok = isinstance(default, float) and math.isinf(default)

    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise ConfigError("expected a number, not a boolean", key=key, value=value)
        if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and not inf_ok)):
            raise ConfigError("expected a finite number", key=key, value=value)
        return value
    return typing.Annotated[ann, BeforeValidator(check)]


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


def plain(value: Any) -> Any:
    """A YAML-serialisable form of a validated value (plug-in objects by their `spec`)."""
    spec = getattr(value, "spec", None)
    if isinstance(value, tuple) and hasattr(value, "_fields") and spec is not None:
        return plain(spec)
    if hasattr(value, "model_dump"):   # a pydantic model among a plug-in's arguments
        return plain(value.model_dump())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):   # a variant
        return plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


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
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    ctx = err.get("ctx") or {}
    allowed = ctx.get("expected") if isinstance(ctx, dict) else None
    return ConfigError(msg[0].lower() + msg[1:] if msg else "invalid value", key=key,
                       value=value, allowed=allowed)
