"""W6-W8 outside fedsim: a plain PyTorch loop over clients, the same loop tuned, and
torch.func.vmap over clients.

    python benchmarks/model_baselines.py loop w6 [threads] [--set rounds=1 ...]
    python benchmarks/model_baselines.py loop-tuned w6 [threads]
    python benchmarks/model_baselines.py vmap w7 [threads]

`loop-tuned` is the plain loop with every CPU measure fedsim's engine takes on its own (the
floor of a per-client loop, for telling engine overhead from kernel speed): the model's exact
ReLU/max-pool commute (`fedsim.models.rewrite`), channels-last image batches, and glibc heap
reuse (`fedsim.heap`).

Same data, model (fedsim's factory returns an ordinary nn.Module), FedAvg settings and final
test evaluation as the fedsim scenario (`model_workloads.load`); minibatches are drawn with
torch's generator (fedsim keys them per client and round): same work, other samples. Prints
one JSON line: {"impl", "workload", "in_loop_s", "in_loop_cpu_s", "final_test_accuracy"}
(in-loop = all rounds plus the final evaluation, as fedsim's wall_s; CPU = process time).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model_workloads import load  # noqa: E402


@torch.no_grad()
def accuracy(net: torch.nn.Module, w: dict[str, Any], xt: torch.Tensor, yt: torch.Tensor,
             fmt: torch.memory_format = torch.contiguous_format) -> float:
    b = w["eval_batch"]
    correct = sum(int((net(xt[s:s + b].contiguous(memory_format=fmt)).argmax(1) == yt[s:s + b]).sum())
                  for s in range(0, len(xt), b))
    return correct / len(xt)


def loop(w: dict[str, Any], tuned: bool = False) -> tuple[float, float]:
    """What most research code does: one model, a Python loop over clients, torch.optim.SGD."""
    x, y, xt, yt = (torch.as_tensor(w[k]) for k in ("x", "y", "x_test", "y_test"))
    n = int(w["sizes"][0])
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    glob, local = w["make"](), w["make"]()
    if tuned:
        from fedsim.heap import reuse_freed_memory
        from fedsim.models.rewrite import pool_before_relu

        reuse_freed_memory()
        glob, local = pool_before_relu(glob), pool_before_relu(local)
    fmt = torch.channels_last if tuned and x.dim() == 4 else torch.contiguous_format
    t0 = time.perf_counter()
    for _ in range(w["rounds"]):
        ids = torch.randperm(w["clients"], generator=g)[: w["per_round"]].tolist()
        acc = [torch.zeros_like(p) for p in glob.parameters()]
        for i in ids:
            local.load_state_dict(glob.state_dict())
            opt = torch.optim.SGD(local.parameters(), lr=w["lr"])
            xi, yi = x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]
            for _ in range(w["steps"]):
                idx = torch.randint(0, n, (w["batch"],), generator=g)
                opt.zero_grad()
                F.cross_entropy(local(xi[idx].contiguous(memory_format=fmt)), yi[idx]).backward()
                opt.step()
            with torch.no_grad():
                for a, p in zip(acc, local.parameters(), strict=True):
                    a += p / len(ids)
        with torch.no_grad():
            for p, a in zip(glob.parameters(), acc, strict=True):
                p.copy_(a)
    acc_final = accuracy(glob, w, xt, yt, fmt)
    return time.perf_counter() - t0, acc_final


def vmap(w: dict[str, Any]) -> tuple[float, float]:
    """torch.func: per-client gradients of all participants at once, vmap(grad(loss))."""
    from torch.func import functional_call, grad
    from torch.func import vmap as fvmap

    x, y, xt, yt = (torch.as_tensor(w[k]) for k in ("x", "y", "x_test", "y_test"))
    n = int(w["sizes"][0])
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = w["make"]()
    glob = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(net, p, (xb,)), yb)
    step = fvmap(grad(loss))
    t0 = time.perf_counter()
    for _ in range(w["rounds"]):
        ids = torch.randperm(w["clients"], generator=g)[: w["per_round"]]
        m = len(ids)
        ps = {k: v.expand(m, *v.shape).clone() for k, v in glob.items()}
        for _ in range(w["steps"]):
            idx = ids[:, None] * n + torch.randint(0, n, (m, w["batch"]), generator=g)
            gs = step(ps, x[idx], y[idx])
            ps = {k: ps[k] - w["lr"] * gs[k] for k in ps}
        glob = {k: v.mean(0) for k, v in ps.items()}
    net.load_state_dict(glob, strict=False)
    acc_final = accuracy(net, w, xt, yt)
    return time.perf_counter() - t0, acc_final


if __name__ == "__main__":
    impl, name = sys.argv[1], sys.argv[2]
    torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3].isdigit() else 1)
    sets = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "--set"]
    w = load(name, sets)
    c0 = time.process_time()
    dt, acc = {"loop": loop, "loop-tuned": lambda w: loop(w, tuned=True), "vmap": vmap}[impl](w)
    print(json.dumps({"impl": impl, "workload": name, "in_loop_s": round(dt, 4),
                      "in_loop_cpu_s": round(time.process_time() - c0, 4),
                      "final_test_accuracy": round(acc, 4)}))
