"""The kernels' own limit: each parameter layer of a workload timed alone, against the GEMM peak.

    python benchmarks/layer_ceiling.py w6            # per-client layers (the loop plan), batch 32
    python benchmarks/layer_ceiling.py w1            # the MLP's client-stacked batched matmuls

For every Linear / Conv layer of the workload's model, at the shapes one client step feeds it
(recorded by forward hooks on one real minibatch), time forward + the backward the training
step needs (weight gradient always; input gradient except for the first layer), hot in cache,
1 thread, median of many calls; FLOPs by fedsim's own counter (`fedsim.models.flops.layer_flops`). Interleaved with the 2048^2 float32 GEMM that defines the peak. The sum
over layers is what a step would take if everything but these kernels were free: no engine
(nor hand-written loop) can beat that fraction of the peak with these kernels.

For `w1` (fedsim's `stacked` plan: activations [m, features, B], one bmm per layer and
product) the kernels are the batched matmuls over the round's m clients.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from fedsim.models.flops import layer_flops

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def median_s(fn: Callable[[], object], calls: int = 40) -> float:
    for _ in range(5):
        fn()
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def gemm_peak() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048 ** 3 / median_s(lambda: a @ b, 7) / 1e9


def layer_kernels(net: nn.Module, batch: torch.Tensor) -> list[tuple[str, float, Callable[[], object]]]:
    """(name, FLOPs, fn) per Linear/Conv layer: fn runs its forward and the step's backward."""
    seen: list[tuple[str, nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.append((n, mod, inp[0].detach())))
             for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    with torch.no_grad():
        net(batch)
    for h in hooks:
        h.remove()
    out = []
    for i, (name, mod, x) in enumerate(seen):
        x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.contiguous()
        x.requires_grad_(i > 0)
        with torch.no_grad():
            y = mod(x)
        wrt = [mod.weight] + ([x] if i > 0 else [])
        cot = torch.ones_like(y)

        def fn(mod: nn.Module = mod, x: torch.Tensor = x, wrt: list = wrt, cot: torch.Tensor = cot) -> object:
            return torch.autograd.grad(mod(x), wrt, cot)
        out.append((name, layer_flops(mod, (x,), y), fn))
    return out


def stacked_mlp_kernels(m: int, sizes: list[int], b: int) -> list[tuple[str, float, Callable[[], object]]]:
    """fedsim's feature-major stacked MLP: per layer baddbmm forward, bmm weight and input grads."""
    out = []
    for i, (d_in, d_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        w, h = torch.randn(m, d_out, d_in), torch.randn(m, d_in, b)
        g, bias = torch.randn(m, d_out, b), torch.randn(m, d_out, 1)

        def fn(w: torch.Tensor = w, h: torch.Tensor = h, g: torch.Tensor = g, bias: torch.Tensor = bias,
               first: bool = i == 0) -> object:
            torch.baddbmm(bias, w, h)
            torch.bmm(g, h.transpose(1, 2))
            return None if first else torch.bmm(w.transpose(1, 2), g)
        out.append((f"linear {d_in}->{d_out} x{m}", 2.0 * m * d_in * d_out * b * (2 if i == 0 else 3), fn))
    return out


def main(workload: str) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if workload in ("w1", "w2"):
        kernels = stacked_mlp_kernels(100, [60, 64, 10], 32)
    else:
        from model_workloads import load

        from fedsim.models.rewrite import pool_before_relu

        w = load(workload, ["data.clients=2"])
        net = pool_before_relu(w["make"]())
        x = torch.as_tensor(w["x"][: w["batch"]])
        kernels = layer_kernels(net, x)
    peaks, rows = [], []
    for name, flops, fn in kernels:
        peaks.append(gemm_peak())
        rows.append({"layer": name, "gflop": flops / 1e9, "ms": median_s(fn) * 1e3})
    peaks.append(gemm_peak())
    peak = statistics.median(peaks)
    total_f, total_ms = sum(r["gflop"] for r in rows), sum(r["ms"] for r in rows)
    for r in rows:
        r["gflops"] = r["gflop"] / r["ms"] * 1e3
        r["peak_fraction"] = r["gflops"] / peak
    res = {"workload": workload, "gemm_gflops": peak, "layers": rows, "step_gflop": total_f,
           "kernels_ms": total_ms, "ceiling_fraction": total_f / total_ms * 1e3 / peak}
    print(f"{workload}: GEMM peak {peak:.1f} GFLOP/s (1 thread, median of {len(peaks)})")
    print("| layer | GFLOP | ms | GFLOP/s | % of peak |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['gflop']:.4f} | {r['ms']:.3f} | {r['gflops']:.1f} | {r['peak_fraction']:.0%} |")
    print(f"| **all layers** | {total_f:.4f} | {total_ms:.3f} | {total_f / total_ms * 1e3:.1f} | "
          f"**{res['ceiling_fraction']:.0%}** |")
    return res


if __name__ == "__main__":
    result = main(sys.argv[1] if len(sys.argv) > 1 else "w6")
    print(json.dumps(result))
