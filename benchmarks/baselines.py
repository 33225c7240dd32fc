"""Reference implementations of workloads W1/W2 outside fedsim, for side-by-side timing.

    python benchmarks/baselines.py floor w1     # batched matmuls over client-stacked weights
    python benchmarks/baselines.py loop w2      # plain PyTorch: one nn.Module, loop over clients

Both train the same MLP 60-64-10 with the same FedAvg math (local SGD, sample-weighted mean)
on the same data (fedsim's LEAF-style synthetic generator, natural split), and print one JSON
line: {"impl", "workload", "in_loop_s", "final_test_accuracy"}. Minibatches are drawn with
torch's generator here (fedsim keys them per client and round): same work, other samples.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

WORKLOADS = {  # clients, per round, rounds, local steps, batch, lr
    "w1": dict(clients=100, per_round=100, rounds=10, steps=10, batch=32, lr=0.05),
    "w2": dict(clients=1000, per_round=100, rounds=5, steps=10, batch=32, lr=0.05),
}


def data(w: dict) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor, torch.Tensor]:
    from fedsim.data import load_dataset

    ds = load_dataset("synthetic", {"samples_per_client": 200}, num_clients=w["clients"], seed=0)
    parts = ds.natural_split
    order = np.concatenate(parts)
    sizes = np.array([len(p) for p in parts])
    return (torch.as_tensor(ds.x_train[order]), torch.as_tensor(ds.y_train[order]), sizes,
            torch.as_tensor(ds.x_test), torch.as_tensor(ds.y_test))


def floor(w: dict) -> tuple[float, float]:
    """Client-stacked weights [m, in, out]; one batched forward/backward per local step."""
    x, y, sizes, xt, yt = data(w)
    offsets = torch.as_tensor(np.concatenate([[0], np.cumsum(sizes)[:-1]]))
    n = torch.as_tensor(sizes)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(60, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    glob = [ref[0].weight.T.detach(), ref[0].bias.detach(), ref[2].weight.T.detach(), ref[2].bias.detach()]
    m, b = w["per_round"], w["batch"]
    t0 = time.perf_counter()
    for _ in range(w["rounds"]):
        ids = torch.randperm(w["clients"], generator=g)[:m]
        ws = [p.expand(m, *p.shape).clone().requires_grad_(True) for p in glob]
        for _ in range(w["steps"]):
            idx = offsets[ids, None] + (torch.rand(m, b, generator=g) * n[ids, None]).long()
            xb, yb = x[idx], y[idx]
            h = torch.relu(torch.baddbmm(ws[1][:, None], xb, ws[0]))
            out = torch.baddbmm(ws[3][:, None], h, ws[2])
            loss = F.cross_entropy(out.reshape(-1, 10), yb.reshape(-1), reduction="sum") / b
            grads = torch.autograd.grad(loss, ws)
            with torch.no_grad():
                for p, gr in zip(ws, grads, strict=True):
                    p -= w["lr"] * gr
        wt = (n[ids].double() / n[ids].sum()).float()
        glob = [torch.tensordot(wt, p.detach(), dims=([0], [0])) for p in ws]
    with torch.no_grad():  # the final evaluation is timed, as it is in fedsim's wall_s
        pred = (torch.relu(xt @ glob[0] + glob[1]) @ glob[2] + glob[3]).argmax(1)
    dt = time.perf_counter() - t0
    return dt, float((pred == yt).double().mean())


def loop(w: dict) -> tuple[float, float]:
    """What most research code does: one model, a Python loop over clients, torch.optim.SGD."""
    x, y, sizes, xt, yt = data(w)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    glob = torch.nn.Sequential(torch.nn.Linear(60, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    local = torch.nn.Sequential(torch.nn.Linear(60, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    t0 = time.perf_counter()
    for _ in range(w["rounds"]):
        ids = torch.randperm(w["clients"], generator=g)[: w["per_round"]].tolist()
        total = sum(int(sizes[i]) for i in ids)
        acc = [torch.zeros_like(p) for p in glob.parameters()]
        for i in ids:
            local.load_state_dict(glob.state_dict())
            opt = torch.optim.SGD(local.parameters(), lr=w["lr"])
            xi, yi = x[offsets[i]:offsets[i] + sizes[i]], y[offsets[i]:offsets[i] + sizes[i]]
            for _ in range(w["steps"]):
                idx = torch.randint(0, int(sizes[i]), (w["batch"],), generator=g)
                opt.zero_grad()
                F.cross_entropy(local(xi[idx]), yi[idx]).backward()
                opt.step()
            with torch.no_grad():
                for a, p in zip(acc, local.parameters(), strict=True):
                    a += p * (sizes[i] / total)
        with torch.no_grad():
            for p, a in zip(glob.parameters(), acc, strict=True):
                p.copy_(a)
    with torch.no_grad():  # the final evaluation is timed, as it is in fedsim's wall_s
        pred = glob(xt).argmax(1)
    dt = time.perf_counter() - t0
    return dt, float((pred == yt).double().mean())


if __name__ == "__main__":
    impl, name = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        torch.set_num_threads(int(sys.argv[3]))
    dt, acc = {"floor": floor, "loop": loop}[impl](WORKLOADS[name])
    print(json.dumps({"impl": impl, "workload": name, "in_loop_s": round(dt, 4),
                      "final_test_accuracy": round(acc, 4)}))
