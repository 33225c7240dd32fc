"""Range-constrained numbers for plug-in signatures (the one place these aliases live).

Plug-in factories annotate their keyword arguments with these; the registry validates scenario
values against them (pydantic reads the `annotated_types` metadata) and names the key, the value
and the allowed range when one is out of range. Plain Python calls are not checked: a factory
that must refuse a combination raises ValueError.
"""

from __future__ import annotations

from typing import Annotated

from annotated_types import Ge, Gt, Le, Lt

PositiveInt = Annotated[int, Gt(0)]
"""An int > 0 (a count of steps, clients, layers...)."""
NonNegativeInt = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
"""A float > 0 (a step size, a scale)."""
NonNegativeFloat = Annotated[float, Ge(0)]
Fraction = Annotated[float, Gt(0), Le(1)]
"""A float in (0, 1] (a ratio of coordinates, a participation probability)."""
Probability = Annotated[float, Ge(0), Le(1)]
"""A float in [0, 1]."""
Momentum = Annotated[float, Ge(0), Lt(1)]
"""A float in [0, 1) (a momentum or decay factor)."""

__all__ = ["PositiveInt", "NonNegativeInt", "PositiveFloat", "NonNegativeFloat", "Fraction",
           "Probability", "Momentum"]
