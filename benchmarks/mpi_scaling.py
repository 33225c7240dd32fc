"""Strong scaling of the MPI engine: the same workload on 1, 2, ... ranks, side by side.

Runs each workload with `fedsim run --engine mpi` under `mpiexec -n K` for every K in --ranks
(and once with the multiplex engine as the in-process reference), then prints a table and
writes JSON: wall time of the rounds (summary.json wall_s, set-up excluded), speed-up over the
smallest rank count, and the share of a round spent inside communication calls (Allreduce,
Iallreduce waits, neighbour exchange, scalar reductions), measured by the engine's comm object
on every rank (mean and max over ranks; it includes waiting for slower ranks).

  python benchmarks/mpi_scaling.py              # W1, W3 ring/torus, CO2 sync/overlap on 1 and 2 ranks
  python benchmarks/mpi_scaling.py --ranks 1 2 4 8 16 --launcher "srun --mpi=pmix"  # a cluster

The JSON also records `parallel_capacity`: how much faster k concurrent single-threaded
processes get through a fixed matmul loop than one (2.0 on two idle cores; less when the cores
are shared or hyper-threads). A k-rank speed-up cannot exceed it.

Use --set KEY=VALUE to override scenario keys (e.g. --set rounds=20 for a quick look).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SCENARIOS = HERE.parent / "scenarios"
WORKLOADS: dict[str, tuple[Path, list[str]]] = {
    "w1": (HERE / "scenarios" / "w1.yaml", []),
    "w3_ring": (HERE / "scenarios" / "w3_ring.yaml", []),
    "w3_torus": (HERE / "scenarios" / "w3_torus.yaml", []),
    # CO2 without / with the one-step-stale outer average: what the Iallreduce overlap hides
    "co2_sync": (SCENARIOS / "co2.yaml", ["strategy.staleness=0", "rounds=60"]),
    "co2_overlap": (SCENARIOS / "co2.yaml", ["strategy.staleness=1", "rounds=60"]),
}


def launcher_cmd(launcher: str | None, ranks: int) -> list[str]:
    """`mpiexec -n K` (Open MPI: --oversubscribe, and --allow-run-as-root as root) or a custom one."""
    if launcher:
        return [*shlex.split(launcher), "-n", str(ranks)]
    exe = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec") or "mpiexec"
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    flags = []
    if "Open MPI" in version or "OpenRTE" in version:
        flags = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return [exe, *flags, "-n", str(ranks)]


def run_once(scenario: Path, engine: str, ranks: int, sets: list[str], launcher: str | None,
             threads: int, out: str) -> dict:
    fedsim = str(BIN / "fedsim") if (BIN / "fedsim").exists() else "fedsim"
    args = [fedsim, "run", str(scenario), "--engine", engine, "--quiet", "--out", out,
            "--set", f"engine.threads={threads}"]
    for s in sets:
        args += ["--set", s]
    cmd = launcher_cmd(launcher, ranks) + args if engine == "mpi" else args
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    total = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    run_dir = res.stdout.strip().splitlines()[-1]
    summary = json.loads(Path(run_dir, "summary.json").read_text())
    mpi = summary.get("mpi", {})
    return {"engine": engine, "ranks": ranks, "threads": threads, "wall_s": summary["wall_s"],
            "process_s": round(total, 3), "test_accuracy": summary["final"]["test_accuracy"],
            "comm_share_mean": mpi.get("comm_share_mean"), "comm_share_max": mpi.get("comm_share_max"),
            "comm_s_by_kind_max": mpi.get("comm_s_by_kind_max"),
            "halo_rows_per_round": mpi.get("halo_rows_per_round")}


def parallel_capacity(k: int, n: int = 256, reps: int = 600) -> float:
    """Throughput of k concurrent single-threaded matmul loops relative to one (ideal: k).

    On a shared or hyper-threaded machine this is below k, and bounds any k-rank speed-up.
    """
    code = (f"import time, torch; torch.set_num_threads(1); a = torch.randn({n}, {n}); "
            f"t = time.perf_counter()\nfor _ in range({reps}): a @ a\nprint(time.perf_counter() - t)")

    def wave(m: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
                 for _ in range(m)]
        return max(float(p.communicate()[0]) for p in procs)
    one = min(wave(1) for _ in range(2))
    return k * one / min(wave(k) for _ in range(2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), help="names or YAML paths")
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--repeats", type=int, default=1, help="best of N")
    p.add_argument("--launcher", default=None, help='e.g. "srun --mpi=pmix" (default: mpiexec)')
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-multiplex", action="store_true", help="skip the in-process reference")
    p.add_argument("--out", default=str(HERE / "out" / "mpi_scaling.json"))
    args = p.parse_args(argv)

    capacity = parallel_capacity(max(args.ranks))
    print(f"  parallel capacity of {max(args.ranks)} processes: {capacity:.2f}x one", file=sys.stderr)
    runs: dict[tuple[str, str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # repeats interleaved, so background load hits all alike
            for name in args.workloads:
                path, sets = WORKLOADS.get(name, (Path(name), []))
                plan = ([] if args.no_multiplex else [("multiplex", 1)]) + [("mpi", k) for k in args.ranks]
                for engine, k in plan:
                    r = run_once(path, engine, k, sets + args.set, args.launcher, args.threads, tmp)
                    runs.setdefault((name, engine, k), []).append(r)
                    print(f"  {name:<9} {engine:<9} ranks={k:<3} wall {r['wall_s']:.2f}s", file=sys.stderr)
    rows = [{"workload": key[0], **min(rs, key=lambda r: r["wall_s"])} for key, rs in runs.items()]
    for r in rows:
        base = next(b for b in rows if b["workload"] == r["workload"] and b["engine"] == "mpi"
                    and b["ranks"] == min(args.ranks))
        r["speedup"] = round(base["wall_s"] / r["wall_s"], 3)
    print(table(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "parallel_capacity": round(capacity, 3),
            "loadavg_at_end": os.getloadavg(), "threads_per_rank": args.threads,
            "sets": args.set, "launcher": args.launcher or "mpiexec"}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def fmt(v: float) -> str:
    return f"{v:.2f}"


def table(rows: list[dict]) -> str:
    head = ("| workload | engine | ranks | wall s (rounds) | speed-up vs 1 rank | comm share mean / max "
            "| Allreduce s | exchange s | halo rows/round/rank |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        kinds = r["comm_s_by_kind_max"] or {}
        share = (f"{r['comm_share_mean']:.1%} / {r['comm_share_max']:.1%}"
                 if r["comm_share_mean"] is not None else "-")
        red = fmt(kinds.get("allreduce", 0) + kinds.get("iallreduce_wait", 0)) if kinds else "-"
        exch = fmt(kinds.get("exchange", 0)) if kinds else "-"
        halo = f"{max(r['halo_rows_per_round']):.0f}" if r["halo_rows_per_round"] else "-"
        lines.append(f"| {r['workload']} | {r['engine']} | {r['ranks']} | {r['wall_s']:.2f} | "
                     f"{r['speedup']:.2f} | {share} | {red} | {exch} | {halo} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
