"""A model for sweep tests whose forward pass fails, is interrupted or gets SIGTERM on demand
(the scenario validates: the failure happens only in passes with gradients, so set-up's fit check,
a forward pass without them, never sees it)."""

from __future__ import annotations

import math
import os
import signal
import time

import torch
from torch import nn


class Flaky(nn.Module):
    """Logistic regression; `fail` decides its forward: never | error | interrupt | sigterm (to
    itself) | sigterm-once (to itself, once per marker file) | sigint-parent | sigterm-parent (to
    the process that started it, then it waits to be interrupted in turn)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, fail: str = "never") -> None:
        super().__init__()
        self.lin = nn.Linear(math.prod(input_shape), num_classes)
        self.fail = fail

    def forward(self, x):
        if not torch.is_grad_enabled() and self.fail != "sigterm-once":
            return self.lin(x.flatten(1))
        if self.fail == "error":
            raise RuntimeError("boom in forward")
        if self.fail == "interrupt":
            raise KeyboardInterrupt
        if self.fail == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        if self.fail == "sigterm-once":  # on the 10th forward pass of the first attempt only
            self.calls = getattr(self, "calls", 0) + 1
            marker = os.environ["FEDSIM_TEST_MARKER"]
            if self.calls == 10 and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGTERM)
        if self.fail.endswith("-parent"):
            sig = signal.SIGINT if self.fail.startswith("sigint") else signal.SIGTERM
            os.kill(os.getppid(), sig)
            time.sleep(60)
        return self.lin(x.flatten(1))
