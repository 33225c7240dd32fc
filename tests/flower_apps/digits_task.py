"""Model, data and training of a quickstart-style PyTorch Flower app on scikit-learn's digits.

Written like Flower's `examples/quickstart-pytorch/pytorchexample/task.py`: a small `Net`,
`load_data(partition_id, num_partitions)` returning DataLoaders (shuffled: it draws from
torch's global RNG), `train` (SGD, optional FedProx proximal term) and `test`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

_DATA: dict[str, np.ndarray] = {}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    if not _DATA:
        from sklearn.datasets import load_digits

        d = load_digits()
        order = np.random.default_rng(42).permutation(len(d.target))
        _DATA["x"], _DATA["y"] = (d.data[order] / 16.0).astype(np.float32), d.target[order]
    return _DATA["x"], _DATA["y"]


def load_data(partition_id: int, num_partitions: int, batch_size: int = 32):
    """IID partition `partition_id` of `num_partitions`, split 80/20 into train/test loaders."""
    x, y = _digits()
    idx = np.array_split(np.arange(len(y)), num_partitions)[partition_id]
    cut = int(0.8 * len(idx))
    tr, te = idx[:cut], idx[cut:]
    ds = lambda i: TensorDataset(torch.from_numpy(x[i]), torch.from_numpy(y[i]))  # noqa: E731
    return DataLoader(ds(tr), batch_size=batch_size, shuffle=True), DataLoader(ds(te), batch_size=64)


def load_centralized_test() -> DataLoader:
    x, y = _digits()
    return DataLoader(TensorDataset(torch.from_numpy(x[-300:]), torch.from_numpy(y[-300:])), batch_size=128)


def train(net: Net, loader: DataLoader, epochs: int, lr: float, proximal_mu: float = 0.0) -> float:
    """Local SGD; with proximal_mu > 0 the FedProx term mu/2 ||w - w_global||^2 is added."""
    global_params = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(xb), yb)
            if proximal_mu > 0:
                loss = loss + proximal_mu / 2 * sum(((p - g) ** 2).sum()
                                                    for p, g in zip(net.parameters(), global_params,
                                                                    strict=True))
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(yb), count + len(yb)
    return total / max(count, 1)


@torch.no_grad()
def test(net: Net, loader: DataLoader) -> tuple[float, float]:
    net.eval()
    loss, correct, n = 0.0, 0, 0
    for xb, yb in loader:
        out = net(xb)
        loss += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
        n += len(yb)
    return loss / n, correct / n
