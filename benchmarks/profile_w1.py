"""Where W1's time goes: fedsim multiplex vs the batched-matmul floor.

    python benchmarks/profile_w1.py torch [--rounds 10] [--threads 1]   # torch.profiler op tables
    python benchmarks/profile_w1.py pyspy [--rounds 30]                  # py-spy, per source line

`torch`: runs W1's round loop in-process (built like the multiplex engine; one warm-up round
excluded) and the floor (benchmarks/baselines.py) under torch.profiler, and prints for each
the ops by self CPU time, op-call counts per local step, and the total.
`pyspy`: samples a whole `fedsim run` of W1 with py-spy (needs py-spy on PATH or in
/tmp/pyspy: `pip install --target /tmp/pyspy py-spy`, nothing installed into the project venv)
and prints the share of samples in start-up vs the round loop, and inside the loop the share
of the deepest fedsim/strategies source line of each sample.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
W1 = os.path.join(HERE, "scenarios", "w1.yaml")


def op_table(prof, steps: int, top: int = 18) -> str:
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    out = [f"  total self CPU {total / 1e6:.3f} s, {sum(e.count for e in rows) / steps:.0f} op calls per local step",
           f"  {'op':<38} {'self s':>8} {'share':>6} {'calls/step':>10}"]
    for e in rows[:top]:
        out.append(f"  {e.key[:38]:<38} {e.self_cpu_time_total / 1e6:8.3f} "
                   f"{e.self_cpu_time_total / max(total, 1):6.1%} {e.count / steps:10.1f}")
    return "\n".join(out)


def torch_profile(rounds: int, threads: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    sys.path.insert(0, HERE)
    import baselines

    from fedsim.config import load_scenario
    from fedsim.engines.loop import RoundLoop
    from fedsim.setup import build_setup

    sc = load_scenario(W1, [f"rounds={rounds + 1}", f"eval.every={rounds + 1}"])
    loop = RoundLoop.from_setup(build_setup(sc), memory_mb=2048)
    loop.step(0)
    steps = rounds * 10
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for t in range(1, rounds + 1):
            loop.step(t)
        dt = time.perf_counter() - t0
    print(f"fedsim multiplex, {rounds} rounds (profiled wall {dt:.3f} s):\n{op_table(prof, steps)}")
    w = dict(baselines.WORKLOADS["w1"], rounds=rounds)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        dt, _ = baselines.floor(w)
    print(f"\nfloor, {rounds} rounds (profiled in-loop {dt:.3f} s; table includes data loading):\n"
          f"{op_table(prof, steps)}")


def pyspy_profile(rounds: int) -> None:
    exe = shutil.which("py-spy") or "/tmp/pyspy/bin/py-spy"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if exe.startswith("/tmp/pyspy"):
        env["PYTHONPATH"] = "/tmp/pyspy"
    fedsim = os.path.join(os.path.dirname(sys.executable), "fedsim")
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "w1.txt")
        subprocess.run([exe, "record", "-r", "250", "-f", "raw", "-o", raw, "--", fedsim, "run", W1,
                        "--quiet", "--out", tmp, "--set", f"rounds={rounds}",
                        "--set", f"eval.every={rounds}", "--set", "engine.threads=1"],
                       check=True, env=env, capture_output=True)
        stacks = []
        with open(raw) as fh:
            for line in fh:
                stack, _, n = line.rstrip().rpartition(" ")
                stacks.append((stack.split(";"), int(n)))
    total = sum(n for _, n in stacks)
    inside = [(f, n) for f, n in stacks if any("RoundLoop.run" in x for x in f)]
    n_in = sum(n for _, n in inside)
    n_imp = sum(n for f, n in stacks if any("_find_and_load" in x for x in f))
    print(f"samples {total}: round loop {n_in / total:.1%}, imports {n_imp / total:.1%}, "
          f"other start-up/teardown {(total - n_in - n_imp) / total:.1%}")
    by_line: collections.Counter = collections.Counter()
    for frames, n in inside:
        proj = [x for x in frames if "fedsim/" in x or "strategies/" in x]
        by_line[proj[-1] if proj else "?"] += n
    print("inside the loop, deepest fedsim/strategies line of each sample:")
    for k, v in by_line.most_common(14):
        print(f"  {v / n_in:6.1%}  {k}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["torch", "pyspy"])
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if a.mode == "torch":
        torch_profile(a.rounds or 10, a.threads)
    else:
        pyspy_profile(a.rounds or 30)


if __name__ == "__main__":
    main()
