"""A problem = clients with data + a way to get their gradients + a way to evaluate a model.

The round loop only talks to this interface, so the same loop runs real data through a
stacked neural network (`DataProblem`) and the closed-form quadratics of `fedsim.testing`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.models import StackedModel
from fedsim.objectives import Regularized
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
    num_params: int            # P
    batch_size: int | None     # samples of one minibatch gradient (None: the local data)
    flops_per_sample: float    # forward + backward FLOPs of one sample (simulated compute)

    def oracle(self, ids: torch.Tensor, round: int) -> Oracle:
        """Gradients of clients `ids` [m] in `round`."""
        ...

    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(test loss [k], test accuracy [k]) of models x [k, P]; None if not defined."""
        ...

    def restrict(self, owned: np.ndarray) -> Problem:
        """The same problem holding only the data of clients `owned` (an MPI rank's slice)."""
        ...


class DataProblem:
    """Clients' samples on one device, a stacked model, a global test set.

    Gradients and evaluation run with `self.plan` (`fedsim.plan.ExecutionPlan`); the engine
    chooses it at set-up with `choose_plan`, and the cost model's choice is taken otherwise.
    ``client_test`` (optional) holds every client's own test split, rows concatenated client
    by client as in `ClientData` (set by `fedsim.setup.Setup.problem`); `evaluate_clients`
    scores models on it. ``client_test_covers``: those splits partition the global test set
    (every test row in exactly one client's split), so the server model's test figures are the
    totals of its per-client scores (`fedsim.round.evaluation`).
    """

    client_test: ClientData | None = None
    client_test_covers: bool = False
    flops_per_sample: float = 0.0  # measured at set-up (`fedsim.system.flops_per_sample`)

    def __init__(self, model: StackedModel, data: ClientData, x_test: torch.Tensor,
                 y_test: torch.Tensor, sizes: np.ndarray, seed: int, batch_size: int | None,
                 eval_batch: int = 2048, nonconvex_reg: float = 0.0,
                 plan: ExecutionPlan | None = None) -> None:
        self.model, self.data, self.x_test, self.y_test = model, data, x_test, y_test
        self.sizes, self.seed, self.batch_size, self.eval_batch = sizes, seed, batch_size, eval_batch
        self.nonconvex_reg = nonconvex_reg
        self.num_clients, self.num_params = len(sizes), model.spec.size
        self.device, self.dtype = data.x.device, data.dtype
        self.plan = plan

    def choose_plan(self, option: str = "auto", block: int | None = None,
                    memory_mb: int = 2048) -> ExecutionPlan:
        """Pick (and from now on use) the execution plan; see `fedsim.plan.choose_plan`."""
        from fedsim.plan import choose_plan

        self.plan = choose_plan(self, option, block, memory_mb)
        return self.plan

    def execution_plan(self) -> ExecutionPlan:
        """The plan in use (the cost model's, chosen on first use, if none was chosen)."""
        return self.plan if self.plan is not None else self.choose_plan()

    def oracle(self, ids: torch.Tensor, round: int) -> Oracle:
        """Gradients of the clients' training losses (plus the scenario's regulariser)."""
        oracle = BlockOracle(self.model, self.data, ids, round, self.seed, self.batch_size,
                             self.execution_plan())
        return Regularized(oracle, self.nonconvex_reg) if self.nonconvex_reg else oracle

    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Test loss and accuracy [k] of models x [k, P]; None without test samples (the metrics
        report null, never a 0.0 that looks measured)."""
        if self.y_test.numel() == 0:
            return None
        return evaluate(self.model, x, self.x_test, self.y_test, self.eval_batch, self.execution_plan(),
                        self.data.normalize)

    @torch.no_grad()
    def evaluate_clients(self, x: torch.Tensor, ids: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Model j of x [k, P] on client ids[j]'s own test split: (loss sum, correct, count).

        Each output is float64 [k]; `fedsim.client_metrics.client_metrics(correct, count,
        loss)` summarises them over clients. None when clients have no test splits. Rows are
        read in blocks of max(1, eval_batch // k) positions per client, padded and masked.
        """
        ct = self.client_test
        if ct is None:
            return None
        k = x.shape[0]
        sizes, offsets = ct.sizes[ids], ct.offsets[ids]
        if k > 1 and x.stride(0) == 0:  # one model for every client (a server model, expanded)
            return self._evaluate_one_model(x[:1], sizes, offsets)
        loss = torch.zeros(k, dtype=torch.float64, device=x.device)
        correct = torch.zeros(k, dtype=torch.float64, device=x.device)
        plan = self.execution_plan()
        n_max, step = int(sizes.max()) if k else 0, max(1, self.eval_batch // max(k, 1))
        for s in range(0, n_max, step):
            pos = torch.arange(s, min(s + step, n_max), device=x.device)[None, :]
            valid = pos < sizes[:, None]
            # padding reads row 0 (an empty last client's offset is the row count)
            rows = torch.where(valid, offsets[:, None] + pos, 0)
            logits = torch.cat([self.model.forward(x[j:j + plan.block], ct.inputs(rows[j:j + plan.block]),
                                                   plan.kind) for j in range(0, k, plan.block)])  # [k, b, C]
            y = ct.y[rows]
            per = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
            loss += torch.where(valid, per, 0).sum(1).double()
            correct += ((logits.argmax(-1) == y) & valid).sum(1).double()
        return loss, correct, sizes.double()

    def _evaluate_one_model(self, x1: torch.Tensor, sizes: torch.Tensor, offsets: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`evaluate_clients` when all k clients are scored by the one model x1 [1, P]: their test
        rows, client after client, go `eval_batch` at a time through one shared forward pass,
        and per-row loss / correctness are summed into each row's client (float64 [k])."""
        ct = self.client_test
        assert ct is not None
        dev, k = x1.device, sizes.numel()
        owner = torch.repeat_interleave(torch.arange(k, device=dev), sizes)
        first = torch.cumsum(sizes, 0) - sizes
        rows = offsets[owner] + torch.arange(owner.numel(), device=dev) - first[owner]
        loss = torch.zeros(k, dtype=torch.float64, device=dev)
        correct = torch.zeros(k, dtype=torch.float64, device=dev)
        plan = self.execution_plan()
        for s in range(0, rows.numel(), self.eval_batch):
            r, o = rows[s:s + self.eval_batch], owner[s:s + self.eval_batch]
            logits = self.model.forward_shared(x1, ct.inputs(r), plan.kind)[0]  # [b, C]
            y = ct.y[r]
            loss.index_add_(0, o, F.cross_entropy(logits, y, reduction="none").double())
            correct.index_add_(0, o, (logits.argmax(-1) == y).double())
        return loss, correct, sizes.double()

    def restrict(self, owned: np.ndarray) -> DataProblem:
        if len(owned) == self.num_clients:
            return self
        out = DataProblem(self.model, self.data.subset(np.asarray(owned)), self.x_test, self.y_test,
                          self.sizes, self.seed, self.batch_size, self.eval_batch, self.nonconvex_reg,
                          self.execution_plan())
        if self.client_test is not None:
            out.client_test = self.client_test.subset(np.asarray(owned))
            out.client_test_covers = self.client_test_covers  # of every process's splits together
        out.flops_per_sample = self.flops_per_sample
        return out

    def memory_per_client(self) -> int:
        """Bytes of one client's parameter-sized working set (model, update, strategy state).

        Used to size the round loop's chunks of clients. Activation memory is not in it: the
        oracle runs a chunk `plan.block` clients at a time, and the plan bounds that block's
        activations by the memory budget (`fedsim.plan`).
        """
        return 16 * self.model.spec.size * torch.empty((), dtype=self.dtype).element_size()


