"""The benchmark suite (issue 7): W1-W5, fedsim side by side with Flower, pfl, a plain PyTorch
loop and the batched-matmul floor. One command runs everything, prints tables, writes JSON.

    python benchmarks/run.py                                  # all workloads, 3 repeats, 1 thread
    python benchmarks/run.py --workloads w1,w2 --repeats 5 --threads 1 --out benchmarks/out/results.json
    python benchmarks/run.py --quick                          # 1 repeat, short W3 probes

Every implementation of every workload runs as its own subprocess, so "process s" is the whole
process (interpreter start, imports, data generation, runtime start-up, training, teardown).
Repeats are interleaved (r1 of everything, then r2, ...) so background load hits all alike;
tables show medians. Measured per run:
  process s     wall time from spawn to exit (os.wait4)
  in-loop s     fedsim: summary.json wall_s (first round to last evaluation; the Flower engine's
                nodes joining before round 1 is set-up, reported as join s);
                baselines / Flower / pfl: the time they print for their training loop
  RSS MB        peak RSS of the spawned process (ru_maxrss from os.wait4; for mpiexec/torchrun
                launchers the largest single process they waited for, not the sum)
  tree MB       multi-process implementations only: peak of the summed RSS of the process tree,
                sampled every 0.2 s (shared library pages counted once per process: an upper bound)
Implementations (W1, W2): fedsim engines multiplex (and multiplex-system: the same with the
whole `system:` model on, SYSTEM_SETS) / flower (in-process grid, multiplexed nodes;
and `multiplex: false`, one ClientApp call per message) / mpi (2 ranks);
floor and loop (benchmarks/baselines.py); flower = plain Flower 1.42 FedAvg app on Ray
(benchmarks/flower_plain.py); W2 also pfl 0.6 in 1 and 2 processes (benchmarks/pfl_w2.py, in
its own venv benchmarks/.venv-pfl; skipped with a note when that venv is missing).
W3: benchmarks/engine_probe.py w3 on ring/torus x 256/4096 nodes + `fedsim run` of the 256-node
scenarios. W4: engine_probe.py w4 (client-store bytes) + `fedsim run`. W5: `fedsim run` of w5
with top-k vs identity compressor (300 rounds), and engine_probe.py w5 (both stepped alternately
in one process: the robust figure for the compression cost per round).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
SCEN = HERE / "scenarios"
PFL_BIN = HERE / ".venv-pfl" / "bin"
sys.path.insert(0, str(HERE))
from report import render, summarize


# ---- measuring one process ---------------------------------------------------------------------
def tree_rss_mb(root: int) -> float:
    """Summed RSS (MB) of `root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total / 2**20


def measure(cmd: list[str], env: dict[str, str], tree: bool, timeout: float) -> dict:
    """Run `cmd`; whole-process wall time, peak RSS (wait4), optional process-tree RSS, output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True)
        peak, done = [0.0], threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                peak[0] = max(peak[0], tree_rss_mb(proc.pid))
        sampler = threading.Thread(target=sample, daemon=True)
        if tree:
            sampler.start()
        timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, 9))
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        timer.cancel()
        done.set()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"rc": proc.returncode, "process_s": wall, "rss_mb": usage.ru_maxrss / 1024,
                "tree_mb": peak[0] if tree else None, "load1": load0,
                "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}


# ---- the implementations -------------------------------------------------------------------------
def mpi_launcher(ranks: int) -> list[str]:
    try:
        from mpi_scaling import launcher_cmd  # the MPI engineers' launcher logic (Open MPI flags)
        return launcher_cmd(None, ranks)
    except ImportError:
        flags = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
        return [str(BIN / "mpiexec"), *flags, "-n", str(ranks)]


# the simulated system switched on (issue 11) with the same work as without: heavy-tailed speeds
# with per-round jitter, per-client links and a deadline every client meets (so every round is
# planned, and nobody is dropped: dropout / over-selection would train fewer clients)
SYSTEM_SETS = ["system.speed={kind: lognormal, median: 1.0e9, sigma: 0.5}", "system.jitter=0.2",
               "system.uplink.bandwidth={kind: uniform, low: 1.0e6, high: 1.0e7}",
               "system.deadline.seconds=1.0e6", "system.server_time=0.01"]


def fedsim_cmd(scenario: str, threads: int, out: str, sets: list[str] = ()) -> list[str]:
    cmd = [str(BIN / "fedsim"), "run", str(SCEN / scenario), "--quiet", "--out", out,
           "--set", f"engine.threads={threads}"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def parse_fedsim(res: dict) -> dict:
    path = res["stdout"].strip().splitlines()[-1]
    s = json.loads(Path(path, "summary.json").read_text())
    return {"in_loop_s": s["wall_s"], "test_accuracy": s["final"]["test_accuracy"],
            "rounds": s["rounds"], "setup_s": s.get("setup_s"), "join_s": s.get("flower_join_s")}


def parse_json(res: dict) -> dict:
    line = [ln for ln in res["stdout"].splitlines() if ln.startswith("{")][-1]
    d = json.loads(line)
    if "final_test_accuracy" in d:
        d["test_accuracy"] = d.pop("final_test_accuracy")
    return d


def plan(workloads: list[str], threads: int, quick: bool, out: str) -> list[dict]:
    """Every (workload, implementation) with its command and parser."""
    py, t = str(BIN / "python"), str(threads)
    items: list[dict] = []

    def add(w: str, impl: str, cmd: list[str], parse, tree: bool = False, **extra) -> None:
        items.append({"workload": w, "impl": impl, "cmd": cmd, "parse": parse, "tree": tree, **extra})

    for w in ("w1", "w2"):
        if w not in workloads:
            continue
        add(w, "fedsim-multiplex", fedsim_cmd(f"{w}.yaml", threads, out), parse_fedsim)
        add(w, "fedsim-multiplex-system", fedsim_cmd(f"{w}.yaml", threads, out, SYSTEM_SETS), parse_fedsim)
        add(w, "fedsim-flower-inprocess",
            fedsim_cmd(f"{w}.yaml", threads, out, ["engine.kind=flower"]), parse_fedsim)
        add(w, "fedsim-flower-per-message",
            fedsim_cmd(f"{w}.yaml", threads, out, ["engine.kind=flower", "engine.multiplex=false"]),
            parse_fedsim)
        add(w, "fedsim-mpi-2ranks",
            mpi_launcher(2) + fedsim_cmd(f"{w}.yaml", threads, out, ["engine.kind=mpi"]), parse_fedsim,
            tree=True)
        add(w, "floor", [py, str(HERE / "baselines.py"), "floor", w, t], parse_json)
        add(w, "loop", [py, str(HERE / "baselines.py"), "loop", w, t], parse_json)
        add(w, "flower", [py, str(HERE / "flower_plain.py"), w, t], parse_json, tree=True)
        if w == "w2" and (PFL_BIN / "python").exists():
            add(w, "pfl-1proc", [str(PFL_BIN / "python"), str(HERE / "pfl_w2.py"), t], parse_json)
            add(w, "pfl-2proc", [str(PFL_BIN / "torchrun"), "--standalone", "--nnodes=1",
                                 "--nproc_per_node=2", str(HERE / "pfl_w2.py"), t], parse_json, tree=True)
    if "w3" in workloads:
        probe = [py, str(HERE / "engine_probe.py"), "w3"]
        for topo, scen in (("ring", "w3_ring.yaml"), ("torus", "w3_torus.yaml")):
            add("w3", f"fedsim-{topo}-256", fedsim_cmd(scen, threads, out), parse_fedsim)
            for n, side in ((256, 16), (4096, 64)):
                rounds = (6 if quick else 21) if n == 256 else (3 if quick else 8)
                sets = [f"rounds={rounds}", f"data.clients={n}"]
                if topo == "torus":
                    sets += [f"topology.rows={side}", f"topology.cols={side}"]
                cmd = probe + [str(SCEN / scen), "--threads", t] + [a for s in sets for a in ("--set", s)]
                add("w3", f"probe-{topo}-{n}", cmd, parse_json)
    if "w4" in workloads:
        add("w4", "fedsim-multiplex", fedsim_cmd("w4.yaml", threads, out), parse_fedsim)
        add("w4", "probe-store", [py, str(HERE / "engine_probe.py"), "w4", str(SCEN / "w4.yaml"),
                                  "--threads", t], parse_json)
        add("w4", "ref-import-torch", [py, "-c", "import torch"], lambda r: {})
    if "w5" in workloads:
        for name, comp in (("ef21-topk-1%", "{name: top_k, ratio: 0.01}"), ("ef21-identity", "{name: identity}")):
            add("w5", name, fedsim_cmd("w5.yaml", threads, out, [f"strategy.compressor={comp}",
                                                                "rounds=300", "eval.every=300"]),
                parse_fedsim)
        add("w5", "probe-interleaved", [py, str(HERE / "engine_probe.py"), "w5", str(SCEN / "w5.yaml"),
                                        "--threads", t], parse_json)
    return items


def machine(threads: int) -> dict:
    code = ("import json, torch, flwr, os; torch.set_num_threads(int(os.environ['T']));"
            "print(json.dumps({'torch': torch.__version__, 'flwr': flwr.__version__,"
            "'torch_threads': torch.get_num_threads()}))")
    env = {**os.environ, "T": str(threads)}
    info = json.loads(subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True,
                                     env=env, check=True).stdout)
    with open("/proc/cpuinfo") as fh:
        cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "?")
    pfl = None
    if (PFL_BIN / "python").exists():
        pfl = subprocess.run([str(PFL_BIN / "python"), "-c", "import pfl; print(pfl.__version__)"],
                             capture_output=True, text=True, check=False).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "pfl": pfl or "not installed", **info}


def git_state() -> str:
    """HEAD and whether the engine's files differ from it (the numbers belong to that code)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT,
                              check=False).stdout.strip()
    dirty = git("status", "--short", "--", "fedsim", "strategies")
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes in fedsim/ or strategies/" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="w1,w2,w3,w4,w5")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per process")
    p.add_argument("--quick", action="store_true", help="1 repeat, short W3 probes")
    p.add_argument("--only", default=None, help="comma list of implementation names to run")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per process")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for every run (e.g. MALLOC_MMAP_THRESHOLD_=1073741824)")
    p.add_argument("--out", default=str(HERE / "out" / "results.json"))
    args = p.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    workloads = args.workloads.split(",")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONWARNINGS": "ignore", **dict(e.split("=", 1) for e in args.env)}
    if not (HERE / "out" / "data_w2.npz").exists() or not (HERE / "out" / "data_w1.npz").exists():
        for w in ("w1", "w2"):
            subprocess.run([str(BIN / "python"), str(HERE / "workload_data.py"), w,
                            str(HERE / "out" / f"data_{w}.npz")], check=True, cwd=ROOT)
    meta = {"machine": machine(args.threads), "threads": args.threads, "repeats": repeats,
            "command": " ".join([Path(sys.executable).name, "benchmarks/run.py", *(argv or sys.argv[1:])]),
            "env": args.env, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "git": git_state()}
    print(f"machine: {meta['machine']}", file=sys.stderr)
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        items = plan(workloads, args.threads, args.quick, tmp)
        if args.only:
            items = [i for i in items if i["impl"] in args.only.split(",")]
        if not (PFL_BIN / "python").exists() and "w2" in workloads:
            print("note: benchmarks/.venv-pfl missing: pfl rows skipped (see pfl_w2.py)", file=sys.stderr)
        for r in range(repeats):
            for it in items:
                res = measure(it["cmd"], env, it["tree"], args.timeout)
                key = (it["workload"], it["impl"])
                if res["rc"] != 0:
                    print(f"  [{r + 1}/{repeats}] {key[0]} {key[1]}: FAILED rc={res['rc']}\n"
                          f"{res['stderr'][-1500:]}", file=sys.stderr)
                    continue
                row = {k: res[k] for k in ("process_s", "rss_mb", "tree_mb", "load1")}
                row.update(it["parse"](res))
                runs.setdefault(key, []).append(row)
                print(f"  [{r + 1}/{repeats}] {key[0]} {key[1]:<24} process {row['process_s']:7.2f} s  "
                      f"in-loop {row.get('in_loop_s') or 0:7.3f} s  RSS {row['rss_mb']:6.0f} MB  "
                      f"load {row['load1']:.1f}", file=sys.stderr, flush=True)
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    meta["loadavg_end"] = os.getloadavg()
    results = summarize(runs)
    print(render(results, meta))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results,
                                          "runs": {f"{w}/{i}": v for (w, i), v in runs.items()}}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
