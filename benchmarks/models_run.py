"""W6-W8 (issue 13): fedsim on real models side by side with a plain PyTorch loop, torch.func.vmap
over clients and Flower 1.41; medians, ratios to the loop, FLOP/s as a fraction of GEMM peak.

    python benchmarks/models_run.py                          # all, 3 repeats, 1 thread
    python benchmarks/models_run.py --workloads w7 --repeats 1 --only fedsim,loop
    python benchmarks/models_run.py --set data.clients=20 --set rounds=1 --repeats 1   # smoke
    python benchmarks/models_run.py --skip w7/vmap --repeats 2   # appends to the same run log
    python benchmarks/models_run.py --repeats 0                  # tables from the run log only

Every finished run is appended to --log (JSON lines, with the overrides it ran under); the
tables are medians over every logged run of the same workload, implementation and overrides.

Each (workload, implementation) is its own process (`run.measure`: wall time, peak RSS),
repeats interleaved. Implementations: `fedsim` (`fedsim run` semantics via fedsim_api.py,
engine.plan auto), `fedsim-stacked-all` (W6 only: plan stacked with every participant in one
pass, the engine's behaviour before execution plans), `fedsim-stacked-10` (W7/W8: stacked,
10 clients per pass), `loop` and `vmap` (model_baselines.py), `flower` (flower_models.py,
W6 only). FLOP/s = FLOPs of one client step (from the plan: Linear/Conv/LSTM layers, x3 for
forward + backward) x client steps / in-loop CPU seconds; the GEMM peak is a single-thread
2048 x 2048 float32 matmul measured in its own process before every repeat (median of all).
`loop-tuned` (model_baselines.py) is the loop with fedsim's CPU measures, the per-client-loop
floor; `layer_ceiling.py` times each layer alone, the kernels' own limit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import BIN, git_state, machine, measure  # noqa: E402

PY = str(BIN / "python")
WORKLOADS = ("w6", "w6_1000", "w7", "w8")
GEMM = ("import torch, time, json; torch.set_num_threads(1); n = 2048;"
        "a, b = torch.randn(n, n), torch.randn(n, n); [a @ b for _ in range(3)]; ts = []\n"
        "for _ in range(7):\n t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)\n"
        "print(json.dumps({'gflops': 2 * n ** 3 / sorted(ts)[3] / 1e9}))")


def plan_items(workloads: list[str], sets: list[str], t: str) -> list[dict]:
    items = []
    extra = [a for s in sets for a in ("--set", s)]
    for w in workloads:
        fed = [PY, str(HERE / "fedsim_api.py"), w, "--set", f"engine.threads={t}", *extra]
        items.append({"workload": w, "impl": "fedsim", "cmd": fed})
        if w == "w6":
            items.append({"workload": w, "impl": "fedsim-stacked-all",
                          "cmd": fed + ["--set", "engine.plan=stacked", "--set", "engine.plan_block=100"]})
        if w in ("w7", "w8"):
            items.append({"workload": w, "impl": "fedsim-stacked-10",
                          "cmd": fed + ["--set", "engine.plan=stacked", "--set", "engine.plan_block=10"]})
        for impl in ("loop", "loop-tuned", "vmap"):
            items.append({"workload": w, "impl": impl,
                          "cmd": [PY, str(HERE / "model_baselines.py"), impl, w, t, *extra]})
        if w == "w6":
            items.append({"workload": w, "impl": "flower", "cmd": [PY, str(HERE / "flower_models.py"), w, t]})
    return items


def client_steps(w: str, sets: list[str]) -> int:
    from model_workloads import load

    d = load(w, sets)
    return d["rounds"] * d["per_round"] * d["steps"]


def summarize(runs: dict, steps: dict, peak: float) -> dict:
    out: dict = {}
    for (w, impl), rows in runs.items():
        ok = [r for r in rows if r.get("in_loop_s") is not None]
        med = {k: statistics.median([r[k] for r in ok]) for k in ("process_s", "in_loop_s", "rss_mb")} if ok else {}
        if ok and all("in_loop_cpu_s" in r for r in ok):
            med["in_loop_cpu_s"] = statistics.median([r["in_loop_cpu_s"] for r in ok])
        med.update({"n": len(ok), "failed": rows[0].get("error") if not ok else None})
        for k in ("plan", "chunk", "test_accuracy", "final_test_accuracy", "flops_per_client_step",
                  "act_mb_per_client"):
            if ok and k in ok[0]:
                med[k] = ok[0][k]
        if ok and len(ok) > 1:
            med["in_loop_range"] = [min(r["in_loop_s"] for r in ok), max(r["in_loop_s"] for r in ok)]
        out.setdefault(w, {})[impl] = med
    for w, res in out.items():
        base = res.get("loop", {})
        flops = res.get("fedsim", {}).get("flops_per_client_step")
        for r in res.values():
            for k in ("in_loop_s", "in_loop_cpu_s"):
                if r.get(k) and base.get(k):
                    r[f"vs_loop{k[7:-2]}"] = r[k] / base[k]
            if r.get("in_loop_cpu_s") and flops:  # CPU seconds: robust to a shared machine's load
                r["gflops"] = flops * steps[w] / r["in_loop_cpu_s"] / 1e9
                r["peak_fraction"] = r["gflops"] / peak
    return out


def render(res: dict, peak: float, meta: dict) -> str:
    lines = [f"GEMM peak (1 thread, 2048^2 fp32): {peak:.1f} GFLOP/s; {meta['machine']['cpu']}, "
             f"torch {meta['machine']['torch']}, git {meta['git']}", ""]
    head = ("| implementation | in-loop s | range | / loop | in-loop CPU s | CPU / loop | process s | "
            "peak RSS MB | GFLOP/s (CPU) | % of peak | plan |")
    for w, r in res.items():
        lines += [f"### {w}", "", head, "|" + "---|" * 11]
        for impl, v in r.items():
            if v.get("failed"):
                lines.append(f"| {impl} | failed: {v['failed'][:120]} |" + " |" * 10)
                continue
            rng, f = v.get("in_loop_range"), (lambda k, fmt=".2f", v=v: format(v[k], fmt) if v.get(k) else "-")
            lines.append(f"| {impl} | {v['in_loop_s']:.2f} | {f'{rng[0]:.2f}-{rng[1]:.2f}' if rng else '-'} | "
                         f"{f('vs_loop')} | {f('in_loop_cpu_s')} | {f('vs_loop_cpu')} | {v['process_s']:.2f} | "
                         f"{v['rss_mb']:.0f} | {f('gflops', '.1f')} | {f('peak_fraction', '.0%')} | "
                         f"{v.get('plan', '-')}{' chunk ' + str(v['chunk']) if v.get('chunk') else ''} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default=None, help="comma list of implementations")
    p.add_argument("--skip", default="", help="comma list of workload/implementation to leave out")
    p.add_argument("--log", default=str(HERE / "out" / "models_runs.jsonl"))
    p.add_argument("--set", action="append", default=[], help="scenario override for every run")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default=str(HERE / "out" / "models.json"))
    args = p.parse_args(argv)
    t = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "PYTHONWARNINGS": "ignore"}
    workloads = args.workloads.split(",")
    items = plan_items(workloads, args.set, t)
    if args.only:
        items = [i for i in items if i["impl"] in args.only.split(",")]
    items = [i for i in items if f"{i['workload']}/{i['impl']}" not in args.skip.split(",")]
    meta = {"machine": machine(args.threads), "git": git_state(), "sets": args.set,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    peak = 0.0
    for r in range(max(args.repeats, 1)):  # the GEMM peak is re-measured with every repeat
        peak = json.loads(measure([PY, "-c", GEMM], env, False, 300)["stdout"])["gflops"]
        for it in items if args.repeats else []:
            res = measure(it["cmd"], env, False, args.timeout)
            row = {k: res[k] for k in ("process_s", "rss_mb", "load1")}
            if res["rc"] == 0:
                row.update(json.loads([ln for ln in res["stdout"].splitlines() if ln.startswith("{")][-1]))
            else:
                row["error"] = (res["stderr"].strip().splitlines() or ["?"])[-1]
            with open(args.log, "a") as fh:
                fh.write(json.dumps({"workload": it["workload"], "impl": it["impl"], "sets": args.set,
                                     "gemm_gflops": peak, **row}) + "\n")
            print(f"  [{r + 1}/{args.repeats}] {it['workload']} {it['impl']:<20} in-loop "
                  f"{row.get('in_loop_s') or 0:8.2f} s  RSS {row['rss_mb']:6.0f} MB  load {row['load1']:.1f}"
                  f"{'  FAILED ' + row['error'][:100] if 'error' in row else ''}", file=sys.stderr, flush=True)
    runs: dict = {}
    peaks = []
    with open(args.log) as fh:
        for line in fh:
            row = json.loads(line)
            if row["workload"] in workloads and row.pop("sets") == args.set:
                runs.setdefault((row.pop("workload"), row.pop("impl")), []).append(row)
                peaks.append(row.pop("gemm_gflops"))
    peak = statistics.median(peaks + [peak])
    steps = {w: client_steps(w, args.set) for w in workloads}
    res = summarize(runs, steps, peak)
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    print(render(res, peak, meta))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "gemm_gflops": peak, "results": res,
                                          "runs": {f"{w}/{i}": v for (w, i), v in runs.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
