"""A problem = clients with data + a way to get their gradients + a way to evaluate a model.

The round loop only talks to this interface, so the same loop runs real data through a
stacked neural network (`DataProblem`) and the closed-form quadratics of `fedsim.testing`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from fedsim.models import StackedModel
from fedsim.oracle import BlockOracle, ClientData, evaluate
from fedsim.types import Oracle

if TYPE_CHECKING:
    from fedsim.plan import ExecutionPlan


class Problem(Protocol):
    """What the round loop needs from a workload."""

    num_clients: int
    sizes: np.ndarray          # [N] local dataset sizes (aggregation weights)
    device: torch.device
    dtype: torch.dtype

    def oracle(self, ids: torch.Tensor, round: int) -> Oracle:
        """Gradients of clients `ids` [m] in `round`."""
        ...

    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(test loss [k], test accuracy [k]) of models x [k, P]; None if not defined."""
        ...

    def restrict(self, owned: np.ndarray) -> "Problem":
        """The same problem holding only the data of clients `owned` (an MPI rank's slice)."""
        ...


class DataProblem:
    """Clients' samples on one device, a stacked model, a global test set.

    Gradients and evaluation run with `self.plan` (`fedsim.plan.ExecutionPlan`); the engine
    chooses it at set-up with `choose_plan`, and the cost model's choice is taken otherwise.
    """

    def __init__(self, model: StackedModel, data: ClientData, x_test: torch.Tensor,
                 y_test: torch.Tensor, sizes: np.ndarray, seed: int, batch_size: int | None,
                 eval_batch: int = 2048, plan: "ExecutionPlan | None" = None) -> None:
        self.model, self.data, self.x_test, self.y_test = model, data, x_test, y_test
        self.sizes, self.seed, self.batch_size, self.eval_batch = sizes, seed, batch_size, eval_batch
        self.num_clients = len(sizes)
        self.device, self.dtype = data.x.device, data.dtype
        self.plan = plan

    def choose_plan(self, option: str = "auto", block: int | None = None,
                    memory_mb: int = 2048) -> "ExecutionPlan":
        """Pick (and from now on use) the execution plan; see `fedsim.plan.choose_plan`."""
        from fedsim.plan import choose_plan

        self.plan = choose_plan(self, option, block, memory_mb)
        return self.plan

    def execution_plan(self) -> "ExecutionPlan":
        """The plan in use (the cost model's, chosen on first use, if none was chosen)."""
        return self.plan if self.plan is not None else self.choose_plan()

    def oracle(self, ids: torch.Tensor, round: int) -> BlockOracle:
        return BlockOracle(self.model, self.data, ids, round, self.seed, self.batch_size,
                           self.execution_plan())

    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return evaluate(self.model, x, self.x_test, self.y_test, self.eval_batch, self.execution_plan(),
                        self.data.normalize)

    def restrict(self, owned: np.ndarray) -> "DataProblem":
        if len(owned) == self.num_clients:
            return self
        return DataProblem(self.model, self.data.subset(np.asarray(owned)), self.x_test, self.y_test,
                           self.sizes, self.seed, self.batch_size, self.eval_batch,
                           self.execution_plan())

    def memory_per_client(self) -> int:
        """Bytes of one client's parameter-sized working set (model, update, strategy state).

        Used to size the round loop's chunks of clients. Activation memory is not in it: the
        oracle runs a chunk `plan.block` clients at a time, and the plan bounds that block's
        activations by the memory budget (`fedsim.plan`).
        """
        return 16 * self.model.spec.size * torch.empty((), dtype=self.dtype).element_size()


