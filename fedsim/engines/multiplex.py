"""The default engine: every client of a round trained together on one device.

All participants of a round (or memory-bounded chunks of them) form one stacked computation:
their parameters are the rows of one [m, P] tensor, their minibatches one [m, B, ...] tensor,
and a local step is one batched forward/backward pass (no Python loop over clients).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from fedsim.checkpoint import Control
from fedsim.constraints import PositiveInt
from fedsim.engines import ENGINES
from fedsim.engines.loop import RoundLoop
from fedsim.setup import Setup
from fedsim.types import OnEval, Progress


class MultiplexEngine:
    """In-process engine (see module docstring); a `fedsim.types.Engine`."""

    name = "multiplex"
    is_root = True

    def __init__(self, chunk_size: int | None, memory_mb: int, threads: int | None,
                 plan: str = "auto", plan_block: int | None = None) -> None:
        self.chunk_size, self.memory_mb, self.threads = chunk_size, memory_mb, threads
        self.plan, self.plan_block = plan, plan_block
        self.loop: RoundLoop | None = None

    def prepare(self, setup: Setup) -> None:
        """Place the data on the device and build the loop (counted as set-up, not as rounds)."""
        if self.threads:
            torch.set_num_threads(self.threads)
        self.loop = RoundLoop.from_setup(setup, memory_mb=self.memory_mb, chunk_size=self.chunk_size,
                                         plan=self.plan, plan_block=self.plan_block)

    def summary_extra(self) -> dict[str, Any]:
        """The simulated clock and the execution plan (kind, block, memory and FLOPs per client)."""
        if self.loop is None:
            return {}
        plan = getattr(self.loop.problem, "plan", None)
        return {"sim": self.loop.clock.summary(), **({"plan": plan.summary()} if plan is not None else {})}

    def run(self, setup: Setup, on_eval: OnEval, progress: Progress | None = None,
            control: Control | None = None) -> list[dict[str, Any]]:
        if self.loop is None:
            self.prepare(setup)
        assert self.loop is not None
        self.loop.on_eval = on_eval
        return self.loop.run(progress, control)


@ENGINES.register("multiplex")
def multiplex(*, chunk_size: PositiveInt | None = None,
              memory_mb: PositiveInt = 2048,
              threads: PositiveInt | None = 1,
              plan: Literal["auto", "measure", "stacked", "vmap", "loop"] = "auto",
              plan_block: PositiveInt | None = None) -> MultiplexEngine:
    """All clients of a round as one stacked computation on one device (CPU or CUDA).

    Args:
      chunk_size: clients per stacked computation; None picks it from `memory_mb`.
      memory_mb: memory bound for one chunk's working set when chunk_size is None.
      threads: torch intra-op CPU threads. 1 (default) is fastest for the many small stacked
        matmuls of typical simulations and never oversubscribes a shared machine; raise it for
        large models; None keeps torch's default.
      plan: how a chunk is executed (`fedsim.plan`): auto (deterministic cost model), measure
        (timed calibration at set-up, like cuDNN's benchmark mode), or a fixed kind: stacked
        (client-folded batched kernels), vmap (torch.func.vmap) or loop (one client at a time).
      plan_block: clients per forward/backward pass; None lets the plan choose.
    """
    return MultiplexEngine(chunk_size, memory_mb, threads, plan, plan_block)
