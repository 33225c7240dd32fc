"""Execution plans: how the oracle runs a chunk of clients (kind and clients per pass).

A plan is a `kind` of `fedsim.models.StackedModel` (``stacked``: client-folded layers;
``vmap``: torch.func.vmap; ``loop``: the plain module once per client) and a `block`: how many
clients one forward/backward pass holds. The oracle splits every chunk of m clients into
blocks, so a pass's activation memory is one block's, never m clients'.

Choosing (`choose_plan`, at set-up):

- ``auto`` (default): a cost model over quantities that do not depend on the clock, so that
  reruns pick the same plan and give bitwise-identical results. One client's step is run once
  to count its FLOPs (`fedsim.models.flops`) and the bytes autograd saves for backward
  (its activation memory). Then:
  * block <= (memory_mb / 2) / activation bytes per client (the memory bound);
  * on CPU, block <= 4 MiB / parameter bytes per client: stacking pays while the block's
    weights stay in cache, and costs memory traffic beyond (measured: an MLP with 18 KB of
    weights runs 20x faster per client stacked 100 at a time than alone, a 2 MB CNN and a
    3 MB LSTM run slowest stacked);
  * on CUDA, the memory bound alone (larger launches fill the device);
  * kind: ``loop`` when the block is 1 (native kernels such as fused nn.LSTM), else
    ``stacked`` where the model has a folded form, else ``vmap``;
  * on CPU, `chunk_cap` also bounds the round loop's chunks so that their [m, P] tensors stay
    below 16 MiB and are reused from the heap (W6: 12 % less CPU time per client step than
    chunks of 61 clients, whose 130 MB tensors were mapped and faulted in every step), and
    `fedsim.heap.reuse_freed_memory` keeps glibc from unmapping freed blocks below 32 MiB.
- ``measure``: like cuDNN's benchmark mode, time a few one-step candidates (each kind,
  blocks 1, 2, 4, ... up to the memory bound, stopping once a kind's time per client grows)
  and take the fastest. Timing noise can flip the choice between runs; plans agree to float
  tolerance, not bitwise.
- ``stacked`` / ``vmap`` / ``loop``: that kind (an error if the model cannot run it), with
  `block` or the cost model's block.

The chosen plan is a small frozen dataclass; `ExecutionPlan.summary()` is what the engine
writes to summary.json.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.errors import ConfigError
from fedsim.heap import reuse_freed_memory
from fedsim.models import KINDS
from fedsim.models.flops import FlopCounter
from fedsim.oracle import BlockOracle

OPTIONS = ("auto", "measure", *KINDS)
CPU_CACHE_BYTES = 4 * 2**20
"""Weights of one block that stacking on CPU keeps hot (measured on a 512 KiB-L2 / 32 MiB-L3
EPYC: MLP and CNN per-client times level off or grow beyond it)."""
CPU_ROW_BYTES = 16 * 2**20
"""On CPU, a chunk's [m, P] tensors (models, updates, gradients) stay below this size: glibc
serves allocations under its mmap threshold (fixed at 32 MiB by `fedsim.heap`) from the heap
and reuses them step after step, while larger ones are mapped and page-faulted in afresh every
local step."""


@dataclass(frozen=True)
class ExecutionPlan:
    """How one chunk of clients is executed (see module docstring).

    Attributes:
      kind: "stacked" | "vmap" | "loop". block: clients per forward/backward pass.
      source: "cost model" | "measured" | "engine option".
      device: where it runs. available: kind -> "" (runs) or why not.
      batch: samples per client and step the figures below are for.
      param_bytes: one client's parameters. act_bytes: what autograd saves in one client's
        step (its activation memory). flops: FLOPs of one client's step (forward + backward).
      peak_bytes: CUDA only: `torch.cuda.max_memory_allocated` growth of a one-client step.
      timings: measured candidates ("kind:block", seconds per client-step), fastest first.
      chunk_cap: CPU only: most clients per round-loop chunk (a multiple of `block`) so that
        the chunk's [m, P] tensors stay under `CPU_ROW_BYTES`; None: no cap.
      heap: CPU only: how freed memory is reused (`fedsim.heap.reuse_freed_memory`).
    """

    kind: str
    block: int
    source: str
    device: str
    available: dict[str, str] = field(default_factory=dict)
    batch: int = 0
    param_bytes: int = 0
    act_bytes: int = 0
    flops: float = 0.0
    peak_bytes: int | None = None
    timings: tuple[tuple[str, float], ...] = ()
    chunk_cap: int | None = None
    heap: str | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready record for summary.json."""
        d = asdict(self)
        d["timings"] = {k: round(v, 6) for k, v in self.timings}
        d["act_mb_per_client"] = round(self.act_bytes / 2**20, 3)
        return d


def choose_plan(problem: Any, option: str = "auto", block: int | None = None,
                memory_mb: int = 2048) -> ExecutionPlan:
    """The plan for a `fedsim.problem.DataProblem` (its model, data, batch size and device).

    Args:
      option: "auto" | "measure" | "stacked" | "vmap" | "loop" (module docstring).
      block: clients per pass; None lets the cost model (or the measurement) choose.
      memory_mb: the memory budget; one block's activations get half of it.
    """
    if option not in OPTIONS:
        raise ConfigError("unknown execution plan", key="engine.plan", value=option,
                          allowed=", ".join(OPTIONS))
    model, dev = problem.model, problem.device
    _check_token_ids(problem)
    heap = reuse_freed_memory() if dev.type == "cpu" else None
    probe = _probe_oracle(problem, 1)
    rows, _ = probe.batch_rows(0)
    available = model.status(problem.data.inputs(rows))
    ok = [k for k in KINDS if available[k] == ""]
    x = model.spec.flatten(model.module).to(dev, problem.dtype)[None]
    stats = _one_client(problem, x)
    param_bytes = model.spec.size * x.element_size()
    c_mem = max(1, int(memory_mb * 2**20 // 2 // max(stats["act"] + 4 * param_bytes, 1)))
    c_cost = c_mem if dev.type == "cuda" else max(1, min(c_mem, CPU_CACHE_BYTES // max(param_bytes, 1)))
    c_cost = min(c_cost, problem.num_clients)
    base = dict(device=str(dev), available=dict(available), batch=int(rows.shape[1]),
                param_bytes=param_bytes, act_bytes=stats["act"], flops=stats["flops"],
                peak_bytes=stats["peak"], heap=heap)

    def plan(kind: str, c: int, source: str, **kw: Any) -> ExecutionPlan:
        cap = None if dev.type == "cuda" else max(1, CPU_ROW_BYTES // param_bytes // c) * c
        return ExecutionPlan(kind, c, source, chunk_cap=cap, **base, **kw)
    if option in KINDS:
        model.resolve(option, problem.data.inputs(rows))
        return plan(option, 1 if option == "loop" else block or c_cost, "engine option")
    if option == "measure":
        timings = _measure(problem, x, ok, [block] if block else _blocks(min(c_mem, problem.num_clients)))
        best, best_c = timings[0][0].split(":")
        return plan(best, int(best_c), "measured", timings=tuple(timings))
    c = block or c_cost
    if c == 1 or ok == ["loop"]:
        return plan("loop", 1, "cost model")
    return plan(ok[0], c, "cost model")


def _check_token_ids(problem: Any) -> None:
    """Token ids must fit the model's largest embedding table (else an IndexError mid-round).

    (Only the largest: a smaller table, such as positions, may be indexed by something else.)
    """
    x = problem.data.x
    if x.is_floating_point() or x.dtype == torch.uint8 or not x.numel():
        return
    tables = [(m.num_embeddings, n) for n, m in problem.model.module.named_modules()
              if isinstance(m, nn.Embedding)]
    if not tables:
        return
    top = int(max(x.max(), problem.x_test.max() if problem.x_test.numel() else 0))
    size, name = max(tables)
    if top >= size:
        raise ConfigError(f"token id {top} is outside the vocabulary of embedding '{name}' "
                          f"({size} entries)", key="model.vocab", value=size,
                          allowed=f"a vocabulary of at least {top + 1} (the model's `vocab` key)")


def _blocks(limit: int) -> list[int]:
    out, c = [], 1
    while c < limit:
        out.append(c)
        c *= 2
    return out + [limit]


def _probe_oracle(problem: Any, m: int, kind: str | None = None, block: int | None = None) -> BlockOracle:
    """An oracle over the m largest clients held (round 0), for set-up measurements."""
    ids = np.argsort(-problem.data.sizes.cpu().numpy(), kind="stable")[:m]
    ids = np.resize(ids, m)
    plan = ExecutionPlan(kind, block or m, "probe", "") if kind else None
    return BlockOracle(problem.model, problem.data, torch.as_tensor(ids, device=problem.device), 0,
                       problem.seed, problem.batch_size, plan)


def _one_client(problem: Any, x: torch.Tensor) -> dict[str, Any]:
    """FLOPs, saved-activation bytes and (CUDA) peak memory of one client's step.

    FLOPs: `fedsim.models.flops.FlopCounter` (Linear / Conv / recurrent / attention layers,
    forward + backward) around the one-client step of the loop plan.
    """
    oracle = _probe_oracle(problem, 1, "loop", 1)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:  # storages saved for backward, each counted once
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
    saving = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with FlopCounter(problem.model.module) as flops, saving:
        oracle(x, 0)
    peak = None
    if cuda:
        torch.cuda.synchronize(x.device)
        peak = int(torch.cuda.max_memory_allocated(x.device) - before)
    act = sum(v for k, v in saved.items() if k != x.untyped_storage().data_ptr())  # not the weights
    return {"flops": flops.total, "act": int(act), "peak": peak}


def _measure(problem: Any, x: torch.Tensor, kinds: list[str], blocks: list[int]) -> list[tuple[str, float]]:
    """Seconds per client-step of each (kind, block) candidate, fastest first (min of 2 runs)."""
    sync = (lambda: torch.cuda.synchronize(x.device)) if x.device.type == "cuda" else (lambda: None)
    out: list[tuple[str, float]] = []
    for kind in kinds:
        best = float("inf")
        for c in [1] if kind == "loop" else blocks:
            oracle = _probe_oracle(problem, c, kind, c)
            xc = x.expand(c, -1).contiguous()
            oracle(xc, 0)  # warm-up (allocator, lazy initialisation)
            times = []
            for step in (1, 2):
                sync()
                t0 = time.perf_counter()
                oracle(xc, step)
                sync()
                times.append((time.perf_counter() - t0) / c)
            t = min(times)
            out.append((f"{kind}:{c}", t))
            if t > 1.25 * best:
                break
            best = min(best, t)
    return sorted(out, key=lambda kv: kv[1])
