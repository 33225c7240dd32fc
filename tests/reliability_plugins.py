"""Plug-ins for the reliability tests: dotted paths that must be refused before they are called,
and models that fail in a known way."""

from __future__ import annotations

import os

import torch
from torch import nn

from fedsim.types import Strategy

MARK = "RELIABILITY_CALLED"  # a refused factory that ran anyway would leave this file in the cwd


def unannotated(**kwargs):  # no return annotation: not a declared strategy factory
    open(MARK, "w").close()


def annotated_wrong() -> int:
    open(MARK, "w").close()
    return 3


def lying() -> Strategy:
    """Declares the contract but returns something else (caught after the call, exit 2)."""
    return 3  # type: ignore[return-value]


class NotAModule:
    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        open(MARK, "w").close()


class WrongOutputs(nn.Module):
    """Three logits whatever the number of classes."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.lin = nn.Linear(input_shape[0], 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class WrongInputs(nn.Module):
    """Expects 7 features whatever the data has."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.lin = nn.Linear(7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class FailsInTraining(nn.Module):
    """Logistic regression whose forward raises once training starts (after set-up's checks:
    the fit check runs without gradients, the FLOP count with gradients once per process)."""

    calls = 0

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.lin = nn.Linear(input_shape[0], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            FailsInTraining.calls += 1
            if FailsInTraining.calls > 1 and os.environ.get("RELIABILITY_FAIL", "1") == "1":
                raise RuntimeError("client blew up")
        return self.lin(x)
