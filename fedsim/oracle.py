"""Client data on the device and the stochastic-gradient oracle for a block of clients.

Minibatches are keyed: client i's local step s of round t reads positions
[s*B, (s+1)*B) of a per-(seed, round, client, epoch) random permutation of its samples,
so every engine, chunking and rank layout sees the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedsim import rng
from fedsim.models import StackedModel


@dataclass
class ClientData:
    """Training samples of all clients, concatenated client by client, on one device.

    Attributes:
      x: [n_total, *feature]; y: [n_total] int64.
      offsets: [N] first row of each client; sizes: [N] number of rows of each client.
    """

    x: torch.Tensor
    y: torch.Tensor
    offsets: torch.Tensor
    sizes: torch.Tensor

    @staticmethod
    def from_parts(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray], device: Any,
                   dtype: torch.dtype) -> ClientData:
        order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        return ClientData(torch.as_tensor(x[order], dtype=dtype, device=device),
                          torch.as_tensor(y[order], dtype=torch.int64, device=device),
                          torch.as_tensor(offsets, device=device), torch.as_tensor(sizes, device=device))

    def subset(self, ids: np.ndarray) -> ClientData:
        """The data of clients `ids` only (what one MPI rank or Flower node holds)."""
        ids_t = torch.as_tensor(ids, device=self.x.device)
        rows = torch.cat([torch.arange(int(o), int(o) + int(n), device=self.x.device)
                          for o, n in zip(self.offsets[ids_t], self.sizes[ids_t], strict=True)])
        sizes = torch.zeros_like(self.sizes)
        sizes[ids_t] = self.sizes[ids_t]
        offsets = torch.zeros_like(self.offsets)
        offsets[ids_t] = torch.cumsum(self.sizes[ids_t], 0) - self.sizes[ids_t]
        return ClientData(self.x[rows], self.y[rows], offsets, sizes)


class BlockOracle:
    """Loss and gradient of m client models on their own minibatches (one round).

    Args:
      model: the stacked model; data: all clients' samples; ids: [m] client ids (device tensor);
      round, seed: keys of the minibatch stream; batch_size: None means full local batch.
    """

    def __init__(self, model: StackedModel, data: ClientData, ids: torch.Tensor, round: int,
                 seed: int, batch_size: int | None) -> None:
        self.model, self.data, self.ids, self.round, self.seed = model, data, ids, round, seed
        self.batch_size = batch_size
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
            w = valid.to(self.data.x.dtype) / self.sizes[:, None].to(self.data.x.dtype)
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
        inputs = self.data.x.index_select(0, rows.reshape(-1)).view(*rows.shape, *self.data.x.shape[1:])
        logits = self.model.logits_class_first(params, inputs)  # [m, C, B]
        per = F.cross_entropy(logits, self.data.y[rows], reduction="none")  # [m, B]
        return per.mean(1) if w is None else (per * w).sum(1)

    def _grad(self, x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        m = x.shape[0]
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_(True)
                      for k, v in self.model.spec.unflatten(x).items()}
            loss = self.loss(leaves, rows, w)
            grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
        return loss.detach(), torch.cat([g.reshape(m, -1) for g in grads], 1)

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
             batch: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss [k] and accuracy [k] of k models x [k, P] on a shared dataset (chunked)."""
    k = x.shape[0]
    loss = torch.zeros(k, dtype=torch.float64, device=x.device)
    correct = torch.zeros(k, dtype=torch.float64, device=x.device)
    n = inputs.shape[0]
    for s in range(0, n, batch):
        xb, yb = inputs[s:s + batch], labels[s:s + batch]
        logits = model.forward_shared(x, xb)
        yy = yb.unsqueeze(0).expand(k, -1)
        loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yy.reshape(-1),
                                reduction="none").view(k, -1).sum(1).double()
        correct += (logits.argmax(-1) == yy).sum(1).double()
    return loss / max(n, 1), correct / max(n, 1)
