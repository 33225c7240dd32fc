"""Measurements inside fedsim's round loop that `fedsim run` does not print (W3, W4).

    python benchmarks/engine_probe.py w3 benchmarks/scenarios/w3_ring.yaml [--set K=V ...] [--threads 1]
    python benchmarks/engine_probe.py w4 benchmarks/scenarios/w4.yaml [--threads 1]
    python benchmarks/engine_probe.py w5 benchmarks/scenarios/w5.yaml [--threads 1]
    python benchmarks/engine_probe.py system benchmarks/scenarios/w1.yaml [--threads 1]

Builds the scenario exactly as the multiplex engine does (`RoundLoop.from_setup`) and prints
one JSON line.
  w3: median seconds of one round (`loop.step`: local steps of every node + the sparse mixing),
      median seconds of the mixing product alone (`comm.mix` of an [N, P] payload with the
      round's W), and the directed edge count of W (nonzeros off the diagonal).
  w4: runs every round, then the client store's bytes (`ClientStore.nbytes()`, rows in use
      `store.used`, bytes per stored client, bytes the buffers reserve incl. growth slack) and
      this process's peak RSS.
  w5: the scenario as written and the same with `compressor: {name: identity}`, built side by
      side in this process and stepped alternately (so background load hits both alike):
      median seconds of one round of each and their difference (the compression cost).
  system: the scenario without and with the simulated system (`run.SYSTEM_SETS`), stepped
      alternately (issue 11): median seconds of one round of each, their ratio, and the median
      seconds per round inside the clock's own calls (plan_round, record_times, flush).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch


def build(path: str, sets: list[str]):
    from fedsim.config import load_scenario
    from fedsim.engines.loop import RoundLoop
    from fedsim.setup import build_setup

    sc = load_scenario(path, sets)
    setup = build_setup(sc)
    engine = sc.engine.params()
    return sc, RoundLoop.from_setup(setup, memory_mb=engine.get("memory_mb", 2048),
                                    chunk_size=engine.get("chunk_size"))


def w3(path: str, sets: list[str], mix_reps: int = 20) -> dict:
    sc, loop = build(path, sets)
    loop.step(0)  # warm-up: builds W, allocates node state
    times = []
    for t in range(1, sc.rounds):
        t0 = time.perf_counter()
        loop.step(t)
        times.append(time.perf_counter() - t0)
    ops = loop.mixing_ops(0)
    n, p = loop.num_clients, loop.problem.model.spec.size
    payload = {"x": torch.randn(n, p, dtype=loop.dtype, device=loop.device)}
    mine = torch.arange(n, device=loop.device)
    mix = []
    for _ in range(mix_reps):
        t0 = time.perf_counter()
        loop.comm.mix(ops, payload, mine, dict(loop.strategy.mixing))
        mix.append(time.perf_counter() - t0)
    w = ops["W"]
    nnz = int(w._nnz()) if w.layout != torch.strided else int((w != 0).sum())
    return {"nodes": n, "params": p, "edges": nnz - n, "rounds_timed": len(times),
            "round_s": statistics.median(times), "mix_s": statistics.median(mix),
            "topology": sc.topology.kind}


def w4(path: str, sets: list[str]) -> dict:
    _, loop = build(path, sets)
    t0 = time.perf_counter()
    loop.run()
    wall = time.perf_counter() - t0
    store = loop.state.store
    reserved = sum(v.numel() * v.element_size() for v in store.buffers.values())
    nbytes = store.nbytes()
    return {"clients": loop.num_clients, "params": loop.problem.model.spec.size,
            "rows_used": store.used, "state_bytes": nbytes,
            "bytes_per_client": nbytes / max(store.used, 1), "reserved_bytes": reserved,
            "state_keys": sorted(store.buffers), "loop_s": wall,
            "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def w5(path: str, sets: list[str], rounds: int = 200) -> dict:
    loops = {"compressed": build(path, [*sets, f"rounds={rounds + 1}"])[1],
             "identity": build(path, [*sets, f"rounds={rounds + 1}", "strategy.compressor={name: identity}"])[1]}
    times: dict[str, list[float]] = {k: [] for k in loops}
    for t in range(rounds + 1):
        for k, loop in loops.items():
            t0 = time.perf_counter()
            loop.step(t)
            if t:  # round 0 is warm-up
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"rounds_timed": rounds, "round_s_compressed": med["compressed"],
            "round_s_identity": med["identity"], "compression_s": med["compressed"] - med["identity"],
            "bytes_up_compressed": loops["compressed"].state.bytes.up,
            "bytes_up_identity": loops["identity"].state.bytes.up}


def system(path: str, sets: list[str], rounds: int = 40) -> dict:
    """The scenario without and with the simulated system (`run.SYSTEM_SETS`), side by side:
    median seconds of one round (`step` + `flush`, the clock's share included) of each."""
    from run import SYSTEM_SETS

    from fedsim import round as kernel

    loops = {"plain": build(path, [*sets, f"rounds={rounds + 1}"])[1],
             "system": build(path, [*sets, f"rounds={rounds + 1}", *SYSTEM_SETS])[1]}
    spent = [0.0]  # seconds inside the clock's kernel calls (planning, recording) this round

    def timed(fn):
        def run(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t0
        return run
    kernel.plan_round, kernel.record_times = timed(kernel.plan_round), timed(kernel.record_times)
    times: dict[str, list[float]] = {k: [] for k in loops}
    clock: dict[str, list[float]] = {k: [] for k in loops}
    for t in range(rounds + 1):
        for k, loop in (loops.items() if t % 2 else reversed(loops.items())):
            spent[0] = 0.0
            t0 = time.perf_counter()
            loop.step(t)
            t1 = time.perf_counter()
            loop.flush()
            if t:  # round 0 is warm-up
                times[k].append(time.perf_counter() - t0)
                clock[k].append(spent[0] + time.perf_counter() - t1)
    med = {k: statistics.median(v) for k, v in times.items()}
    own = {k: statistics.median(v) for k, v in clock.items()}
    return {"rounds_timed": rounds, "round_s_plain": med["plain"], "round_s_system": med["system"],
            "ratio": med["system"] / med["plain"], "clock_s_plain": own["plain"],
            "clock_s_system": own["system"], "clock_share_system": own["system"] / med["system"],
            "sim_time_s": loops["system"].clock.now}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["w3", "w4", "w5", "system"])
    p.add_argument("scenario")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = {"w3": w3, "w4": w4, "w5": w5, "system": system}[args.what](args.scenario, args.set)
    print(json.dumps({"probe": args.what, "threads": torch.get_num_threads(), **res}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
