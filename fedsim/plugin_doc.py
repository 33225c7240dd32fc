"""Human-readable keys of a plug-in: name, type with its constraints, default (``fedsim list``).

Types come from the factory's annotations (``Annotated[float, Field(gt=0)]`` reads
``float > 0``, ``Literal["a", "b"]`` reads ``a | b``); a key without a default is required.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

from fedsim.registry import plain

_OPS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def type_text(hint: Any) -> str:
    """``int >= 1``, ``float > 0 | None``, ``per_class | per_client``, ``list[int > 0]``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        bounds: list[str] = []
        for meta in args[1:]:
            for item in (meta, *getattr(meta, "metadata", ())):
                bounds += [f"{sym} {getattr(item, op)}" for op, sym in _OPS
                           if getattr(item, op, None) is not None]
        base = type_text(args[0])
        return f"{base} {', '.join(dict.fromkeys(bounds))}" if bounds else base
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_text(a) for a in args)
    if origin in (list, tuple, dict, set):
        inner = ", ".join("..." if a is Ellipsis else type_text(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    if hint is type(None):
        return "None"
    from fedsim.registry import variant_tag

    tag = variant_tag(hint)
    if tag is not None:   # a variant dataclass: {kind: tag, key: type, ...}
        fields = typing.get_type_hints(hint, include_extras=True)
        keys = "".join(f", {k}: {type_text(t)}" for k, t in fields.items() if k != "kind")
        return f"{{kind: {tag}{keys}}}"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def param_lines(registry: Any, name: str) -> list[str]:
    """One line per scenario key of plug-in `name`: ``key: type = default`` or ``(required)``."""
    fn = registry.get(name)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # noqa: BLE001 - a user plug-in with unresolvable annotations: show them as written
        hints = {}
    lines = []
    for key, p in registry.params(name).items():
        hint = hints.get(key, p.annotation)
        text = "any" if hint is inspect.Parameter.empty else (
            hint if isinstance(hint, str) else type_text(hint))
        tail = "(required)" if p.default is inspect.Parameter.empty else f"= {plain(p.default)!r}"
        lines.append(f"{key}: {text} {tail}")
    return lines
