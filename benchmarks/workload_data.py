"""W1/W2 data as one .npz, so peers outside fedsim's venv (pfl, Flower clients) train on it.

    python benchmarks/workload_data.py w2 benchmarks/out/data_w2.npz   # needs fedsim
    load("benchmarks/out/data_w2.npz")                                 # numpy only

The arrays are fedsim's own (the scenario's dataset and partition, same seed): `x` [n, 60] and
`y` [n] ordered client by client, `offsets` / `sizes` [N] locate client i's rows, `x_test` /
`y_test` the pooled test set.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


def dump(workload: str, path: str) -> str:
    """Write the data of scenario benchmarks/scenarios/<workload>.yaml to `path` (.npz)."""
    from fedsim.config import load_scenario
    from fedsim.data import load_dataset, partition

    sc = load_scenario(os.path.join(HERE, "scenarios", f"{workload}.yaml"))
    ds = load_dataset(sc.data.dataset, sc.data.params(), num_clients=sc.data.clients, seed=sc.seed)
    parts = partition(sc.data.partition.kind, sc.data.partition.params(), ds,
                      num_clients=sc.data.clients, seed=sc.seed)
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    order = np.concatenate(parts)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, x=ds.x_train[order].astype(np.float32), y=ds.y_train[order].astype(np.int64),
             offsets=np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64), sizes=sizes,
             x_test=ds.x_test.astype(np.float32), y_test=ds.y_test.astype(np.int64))
    os.replace(tmp, path)
    return path


def load(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def client(d: dict[str, np.ndarray], i: int) -> tuple[np.ndarray, np.ndarray]:
    o, n = int(d["offsets"][i]), int(d["sizes"][i])
    return d["x"][o:o + n], d["y"][o:o + n]


if __name__ == "__main__":
    print(dump(sys.argv[1], sys.argv[2]))


class Net(nn.Module):
    """The workloads' MLP 60-64-10, as the peers outside fedsim write it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(60, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def train_steps(net: nn.Module, loader: object, steps: int, lr: float) -> float:
    """`steps` SGD steps over a DataLoader, as Flower's examples train; returns the mean loss."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    done, total = 0, 0.0
    while done < steps:
        for xb, yb in loader:  # type: ignore[attr-defined]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(xb), yb)
            loss.backward()
            opt.step()
            done, total = done + 1, total + loss.item()
            if done == steps:
                break
    return total / steps
