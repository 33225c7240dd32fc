"""The model registry and `build_model` (registered kinds or any nn.Module by dotted path)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from fedsim.errors import ConfigError
from fedsim.registry import Registry

MODELS = Registry("models", builtins=("fedsim.models",), reserved=("input_shape", "num_classes"))


def build_model(kind: str, params: dict[str, Any], *, input_shape: tuple[int, ...],
                num_classes: int) -> nn.Module:
    """Model from the registry, or any nn.Module class / factory by dotted path."""
    factory = MODELS.get(kind)
    if kind in MODELS.names():
        return MODELS.build(kind, params, input_shape=tuple(input_shape), num_classes=num_classes)
    sig = inspect.signature(factory)
    runtime = {k: v for k, v in (("input_shape", tuple(input_shape)), ("num_classes", num_classes))
               if k in sig.parameters}
    try:
        module = factory(**params, **runtime)
    except TypeError as exc:
        raise ConfigError(f"cannot build model {kind}: {exc}", key="kind", value=kind) from None
    if not isinstance(module, nn.Module):
        raise ConfigError("dotted-path model must return a torch.nn.Module", key="kind", value=kind)
    return module
