"""Client data on the device and the stochastic-gradient oracle for a block of clients.

Minibatches are keyed: client i's local step s of round t reads positions
[s*B, (s+1)*B) of a per-(seed, round, client, epoch) random permutation of its samples,
so every engine, chunking and rank layout sees the same samples.

Inputs are stored compactly on the device and converted when a minibatch is gathered: float
features in the compute dtype, uint8 images as uint8 (scaled to [0, 1] in the compute dtype
per minibatch), integer token ids as int64 (never cast to float). The oracle runs its m
clients in blocks of `plan.block` clients with the plan's kind (`fedsim.plan`): the memory of
one forward/backward pass is that of one block, whatever m is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from fedsim import rng
from fedsim.models import StackedModel

if TYPE_CHECKING:
    from fedsim.plan import ExecutionPlan


def device_inputs(x: np.ndarray | torch.Tensor, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """Model inputs on `device`, stored compactly: floats in `dtype`, uint8 kept as uint8
    (images, scaled by `to_compute` per minibatch), other integers as int64 (token ids)."""
    t = torch.as_tensor(x)
    if t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    if t.dtype == torch.uint8:
        return t.to(device=device)
    if t.dtype == torch.bool:
        return t.to(device=device, dtype=dtype)
    return t.to(device=device, dtype=torch.int64)


def to_compute(x: torch.Tensor, dtype: torch.dtype, normalize: Any = None) -> torch.Tensor:
    """A gathered minibatch as the model sees it: uint8 pixels -> `dtype` (scaled to [0, 1], or
    by `normalize.apply_torch(x, dtype)`: scale, per-channel mean/std), int64 unchanged,
    floats in `dtype`."""
    if x.dtype == torch.uint8:
        return normalize.apply_torch(x, dtype) if normalize is not None else x.to(dtype).mul_(1.0 / 255.0)
    if x.is_floating_point():
        return x.to(dtype)
    return x


def model_batch(ds: Any, rows: Any, dtype: torch.dtype) -> torch.Tensor:
    """Training rows `rows` of dataset `ds` on the CPU as the model sees a minibatch of them
    (set-up checks and FLOP counting)."""
    return to_compute(device_inputs(ds.x_train[rows], "cpu", dtype), dtype, ds.normalize)


@dataclass
class ClientData:
    """Training samples of all clients, concatenated client by client, on one device.

    Attributes:
      x: [n_total, *feature] as stored (`device_inputs`); y: [n_total] int64.
      offsets: [N] first row of each client; sizes: [N] number of rows of each client.
      dtype: the compute dtype minibatches are converted to (`to_compute`).
      normalize: how uint8 pixels become floats (an object with `apply_torch(x, dtype)`, e.g.
        `fedsim.data.Normalize`); None scales them by 1/255.
    """

    x: torch.Tensor
    y: torch.Tensor
    offsets: torch.Tensor
    sizes: torch.Tensor
    dtype: torch.dtype = torch.float32
    normalize: Any = None

    @staticmethod
    def from_parts(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray], device: Any,
                   dtype: torch.dtype, normalize: Any = None) -> ClientData:
        order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        return ClientData(device_inputs(x[order], device, dtype),
                          torch.as_tensor(y[order], dtype=torch.int64, device=device),
                          torch.as_tensor(offsets, device=device), torch.as_tensor(sizes, device=device),
                          dtype, normalize)

    def inputs(self, rows: torch.Tensor) -> torch.Tensor:
        """Model inputs [*rows.shape, *feature] of the rows `rows`, in the compute layout."""
        flat = self.x.index_select(0, rows.reshape(-1))  # [rows, *feature]: Normalize's channel axis 1
        return to_compute(flat, self.dtype, self.normalize).view(*rows.shape, *self.x.shape[1:])

    def subset(self, ids: np.ndarray) -> ClientData:
        """The data of clients `ids` only (what one MPI rank or Flower node holds)."""
        ids_t = torch.as_tensor(ids, device=self.x.device)
        rows = torch.cat([torch.arange(int(o), int(o) + int(n), device=self.x.device)
                          for o, n in zip(self.offsets[ids_t], self.sizes[ids_t], strict=True)])
        sizes = torch.zeros_like(self.sizes)
        sizes[ids_t] = self.sizes[ids_t]
        offsets = torch.zeros_like(self.offsets)
        offsets[ids_t] = torch.cumsum(self.sizes[ids_t], 0) - self.sizes[ids_t]
        return ClientData(self.x[rows], self.y[rows], offsets, sizes, self.dtype, self.normalize)


class BlockOracle:
    """Loss and gradient of m client models on their own minibatches (one round).

    Args:
      model: the stacked model; data: all clients' samples; ids: [m] client ids (device tensor);
      round, seed: keys of the minibatch stream; batch_size: None means full local batch;
      plan: how to execute (kind, clients per pass); None: the model's first available kind,
        all m clients in one pass.
    """

    def __init__(self, model: StackedModel, data: ClientData, ids: torch.Tensor, round: int,
                 seed: int, batch_size: int | None, plan: ExecutionPlan | None = None) -> None:
        self.model, self.data, self.ids, self.round, self.seed = model, data, ids, round, seed
        self.batch_size = batch_size
        self.kind = plan.kind if plan is not None else None
        self.block = plan.block if plan is not None else None
        self.sizes = data.sizes[ids]
        self.offsets = data.offsets[ids]
        self._perms: dict[int, torch.Tensor] = {}
        self.calls = 0

    def _perm(self, epoch: int) -> torch.Tensor:
        """[m, n_max] per-client random order of local sample positions for `epoch`."""
        if epoch not in self._perms:
            n_max = int(self.sizes.max())
            pos = torch.arange(n_max, device=self.ids.device)
            keys = rng.bits_torch(self.seed, rng.DATA, self.round, self.ids[:, None], epoch, pos[None, :],
                                  device=self.ids.device)
            keys = torch.where(pos[None, :] < self.sizes[:, None], keys, torch.iinfo(torch.int64).max)
            self._perms[epoch] = torch.argsort(keys, dim=1)
        return self._perms[epoch]

    def batch_rows(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Global row indices [m, B] of each client's minibatch at `step`, and per-row weights."""
        if self.batch_size is None:
            n_max = int(self.sizes.max())
            pos = torch.arange(n_max, device=self.ids.device)[None, :]
            valid = pos < self.sizes[:, None]
            rows = self.offsets[:, None] + torch.where(valid, pos, 0)
            w = valid.to(self.data.dtype) / self.sizes[:, None].to(self.data.dtype)
            return rows, (None if bool(valid.all()) else w)
        b = self.batch_size
        p = step * b + torch.arange(b, device=self.ids.device)[None, :]
        epoch = torch.div(p, self.sizes[:, None], rounding_mode="floor")
        r = p - epoch * self.sizes[:, None]
        e_lo, e_hi = int(epoch.min()), int(epoch.max())
        local = torch.zeros_like(r)
        for e in range(e_lo, e_hi + 1):
            sel = epoch == e
            local = torch.where(sel, torch.gather(self._perm(e), 1, r), local)
        return self.offsets[:, None] + local, None

    def loss(self, params: dict[str, torch.Tensor], rows: torch.Tensor, w: torch.Tensor | None
             ) -> torch.Tensor:
        """Per-client loss [m] of parameters `params` (named [m, *shape] tensors) on `rows`."""
        logits = self.model.logits_class_first(params, self.data.inputs(rows), self.kind)  # [m, C, B]
        per = F.cross_entropy(logits, self.data.y[rows], reduction="none")  # [m, B]
        return per.mean(1) if w is None else (per * w).sum(1)

    def _grad(self, x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss [m] and gradient [m, P], computed `block` clients at a time."""
        self.calls += 1
        m = x.shape[0]
        c = min(self.block or m, m)
        if c == m:
            return self._grad_block(x, rows, w)
        loss = torch.empty(m, dtype=x.dtype, device=x.device)
        grad = torch.empty_like(x)
        for j in range(0, m, c):
            sl = slice(j, j + c)
            loss[sl] = self._grad_block(x[sl], rows[sl], None if w is None else w[sl], grad[sl])[0]
        return loss, grad

    def _grad_block(self, x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor | None,
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        m = x.shape[0]
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_(True)
                      for k, v in self.model.spec.unflatten(x).items()}
            loss = self.loss(leaves, rows, w)
            grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
        flat = [g.reshape(m, -1) for g in grads]
        return loss.detach(), torch.cat(flat, 1, out=out) if out is not None else torch.cat(flat, 1)

    def __call__(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, w = self.batch_rows(step)
        return self._grad(x, rows, w)

    def full(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full local-batch loss [m] and gradient [m, P] (ignores batch_size)."""
        saved, self.batch_size = self.batch_size, None
        try:
            rows, w = self.batch_rows(0)
        finally:
            self.batch_size = saved
        return self._grad(x, rows, w)


@torch.no_grad()
def evaluate(model: StackedModel, x: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
             batch: int = 2048, plan: ExecutionPlan | None = None, normalize: Any = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss [k] and accuracy [k] of k models x [k, P] on a shared dataset.

    Samples go `batch` at a time and models `plan.block` at a time (all k without a plan);
    `inputs` are stored inputs (`device_inputs`), converted per batch to x's dtype
    (`to_compute` with `normalize`).
    """
    k = x.shape[0]
    kind, c = (plan.kind, plan.block) if plan is not None else (None, k)
    loss = torch.zeros(k, dtype=torch.float64, device=x.device)
    correct = torch.zeros(k, dtype=torch.float64, device=x.device)
    n = inputs.shape[0]
    for s in range(0, n, batch):
        xb, yb = to_compute(inputs[s:s + batch], x.dtype, normalize), labels[s:s + batch]
        for j in range(0, k, c):
            logits = model.forward_shared(x[j:j + c], xb, kind)
            yy = yb.unsqueeze(0).expand(logits.shape[0], -1)
            loss[j:j + c] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yy.reshape(-1),
                                             reduction="none").view(logits.shape[0], -1).double().sum(1)
            correct[j:j + c] += (logits.argmax(-1) == yy).sum(1).double()
    return loss / max(n, 1), correct / max(n, 1)
