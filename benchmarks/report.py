"""Medians, ratios, goal checks and Markdown tables for benchmarks/run.py (no heavy imports)."""

from __future__ import annotations

import statistics
from typing import Any

W12 = ("fedsim-multiplex", "fedsim-flower-inprocess", "fedsim-flower-per-message", "fedsim-mpi-2ranks",
       "floor", "loop", "flower", "pfl-1proc", "pfl-2proc")


def summarize(runs: dict[tuple[str, str], list[dict]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{workload: {impl: {field: median over repeats, "n": repeats}}} plus derived ratios."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (w, impl), rows in runs.items():
        med: dict[str, Any] = {"n": len(rows)}
        for k in rows[0]:
            vals = [r[k] for r in rows if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
            med[k] = statistics.median(vals) if vals else rows[0][k]
            if len(vals) > 1 and k in ("process_s", "in_loop_s"):
                med[k + "_range"] = [min(vals), max(vals)]
        out.setdefault(w, {})[impl] = med
    for w in ("w1", "w2"):
        res = out.get(w, {})
        floor, flower = res.get("floor", {}), res.get("flower", {})
        for r in res.values():
            if floor.get("in_loop_s"):
                r["in_loop_vs_floor"] = r["in_loop_s"] / floor["in_loop_s"]
            if flower.get("process_s"):
                r["flower_process_speedup"] = flower["process_s"] / r["process_s"]
                r["flower_in_loop_speedup"] = flower["in_loop_s"] / r["in_loop_s"]
    for r in out.get("w3", {}).values():
        if "edges" in r:
            r["mix_us_per_nonzero"] = 1e6 * r["mix_s"] / (r["edges"] + r["nodes"])
            r["round_us_per_node"] = 1e6 * r["round_s"] / r["nodes"]
    for r in out.get("w5", {}).values():
        if "rounds" in r:
            r["round_ms"] = 1e3 * r["in_loop_s"] / r["rounds"]
    return out


def _f(v: Any, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def goals(res: dict) -> list[str]:
    lines = []
    for w in ("w1", "w2"):
        r = res.get(w, {})
        mx = r.get("fedsim-multiplex")
        if not mx:
            continue
        if "in_loop_vs_floor" in mx:
            v = mx["in_loop_vs_floor"]
            lines.append(f"- {w.upper()} multiplex in-loop / floor = {v:.2f} (goal <= 1.5): "
                         f"{'met' if v <= 1.5 else 'NOT met'}")
        if "flower_process_speedup" in mx:
            v = mx["flower_process_speedup"]
            lines.append(f"- {w.upper()} Flower process / multiplex process = {v:.1f}x (goal >= 20x): "
                         f"{'met' if v >= 20 else 'NOT met'} (in-loop: {mx['flower_in_loop_speedup']:.0f}x)")
        fl = r.get("fedsim-flower-inprocess")
        if fl and fl.get("in_loop_s"):
            v = fl["in_loop_s"] / mx["in_loop_s"]
            join = f", nodes joining {fl['join_s']:.3f} s before round 1" if fl.get("join_s") else ""
            lines.append(f"- {w.upper()} engine flower (multiplexed grid) in-loop / multiplex in-loop = "
                         f"{v:.2f} (goal <= 2): {'met' if v <= 2 else 'NOT met'}{join}")
        pfl2 = r.get("pfl-2proc")
        if pfl2:
            ok = mx["in_loop_s"] < pfl2["in_loop_s"]
            lines.append(f"- {w.upper()} multiplex (1 process) in-loop {mx['in_loop_s']:.3f} s vs pfl in 2 "
                         f"processes {pfl2['in_loop_s']:.3f} s (whole process {mx['process_s']:.2f} vs "
                         f"{pfl2['process_s']:.2f} s): {'met' if ok else 'NOT met'}")
    w4 = res.get("w4", {}).get("fedsim-multiplex")
    if w4:
        lines.append(f"- W4 peak RSS {w4['rss_mb']:.0f} MB (goal: well inside 2048 MB): "
                     f"{'met' if w4['rss_mb'] < 1024 else 'NOT met' if w4['rss_mb'] >= 2048 else 'inside, not well inside'}")
    return lines


def render(res: dict, meta: dict) -> str:
    m = meta["machine"]
    out = [(f"Code: {meta.get('git', '?')}. Machine: {m['cpu']}, {m['cores']} cores ({m['machine']}), {m['mem_gb']} GB; Python "
           f"{m['python']}, torch {m['torch']} ({m['torch_threads']} thread(s) per process), flwr "
           f"{m['flwr']}, pfl {m['pfl']}. Medians of {meta['repeats']} run(s); load average at end "
           f"{', '.join(f'{x:.1f}' for x in meta['loadavg_end'])}."), ""]
    for w in ("w1", "w2"):
        if w not in res:
            continue
        out += [f"### {w.upper()}", "",
                ("| implementation | process s | in-loop s | peak RSS MB | tree RSS MB | test acc | "
                 "in-loop / floor | Flower process / this | Flower in-loop / this |"),
                "|---|---|---|---|---|---|---|---|---|"]
        for impl in W12:
            r = res[w].get(impl)
            if r:
                out.append(f"| {impl} | {_f(r['process_s'])} | {_f(r.get('in_loop_s'), '.3f')} | "
                           f"{_f(r['rss_mb'], '.0f')} | {_f(r.get('tree_mb'), '.0f')} | "
                           f"{_f(r.get('test_accuracy'), '.4f')} | {_f(r.get('in_loop_vs_floor'))} | "
                           f"{_f(r.get('flower_process_speedup'), '.1f')} | "
                           f"{_f(r.get('flower_in_loop_speedup'), '.1f')} |")
        out.append("")
    if "w3" in res:
        r3 = res["w3"]
        out += ["### W3 (gossip D-SGD, 1 local step; probe = median of timed rounds, warm-up excluded)", "",
                "| run | nodes | directed edges | round ms | round us / node | mix ms | mix us / nonzero (edges+diag) |",
                "|---|---|---|---|---|---|---|"]
        for k, r in r3.items():
            if k.startswith("probe"):
                out.append(f"| {k} | {r['nodes']} | {r['edges']} | {1e3 * r['round_s']:.2f} | "
                           f"{r['round_us_per_node']:.1f} | {1e3 * r['mix_s']:.3f} | {r['mix_us_per_nonzero']:.3f} |")
        for k, r in r3.items():
            if not k.startswith("probe"):
                out.append(f"| `fedsim run` {k} (100 rounds): process {r['process_s']:.2f} s, in-loop "
                           f"{r['in_loop_s']:.2f} s, node acc {_f(r.get('test_accuracy'), '.4f')} | | | | | | |")
        out.append("")
    if "w4" in res:
        r4 = res["w4"]
        out += ["### W4 (SCAFFOLD, 10,000 clients, 1 % per round, 20 rounds)", "",
                "| run | process s | in-loop s | peak RSS MB | state rows | state bytes | bytes / client | reserved bytes |",
                "|---|---|---|---|---|---|---|---|"]
        for k, r in r4.items():
            out.append(f"| {k} | {_f(r['process_s'])} | {_f(r.get('in_loop_s') or r.get('loop_s'), '.3f')} | "
                       f"{r['rss_mb']:.0f} | {r.get('rows_used', '-')} | {r.get('state_bytes', '-')} | "
                       f"{_f(r.get('bytes_per_client'), '.0f')} | {r.get('reserved_bytes', '-')} |")
        out.append("")
    if "w5" in res:
        r5 = res["w5"]
        out += ["### W5 (EF21, logistic, 100 clients, 300 rounds for timing resolution)", "",
                "| compressor | process s | in-loop s | ms / round | test acc |", "|---|---|---|---|---|"]
        for k, r in r5.items():
            if "round_ms" in r:
                out.append(f"| {k} | {r['process_s']:.2f} | {r['in_loop_s']:.3f} | {r['round_ms']:.3f} | "
                           f"{_f(r.get('test_accuracy'), '.4f')} |")
        if {"ef21-topk-1%", "ef21-identity"} <= set(r5):
            d = r5["ef21-topk-1%"]["round_ms"] - r5["ef21-identity"]["round_ms"]
            out.append(f"\nTop-k compression cost from whole runs: {d:+.3f} ms per round "
                       f"({d / r5['ef21-identity']['round_ms']:+.0%} of an uncompressed round).")
        p5 = r5.get("probe-interleaved")
        if p5:
            out.append(f"Interleaved in one process ({p5['rounds_timed']} rounds each, medians): top-k "
                       f"{1e3 * p5['round_s_compressed']:.3f} ms vs identity {1e3 * p5['round_s_identity']:.3f} ms"
                       f" per round: compression costs {1e3 * p5['compression_s']:+.3f} ms per round "
                       f"({p5['compression_s'] / p5['round_s_identity']:+.0%}); uplink bytes "
                       f"{p5['bytes_up_compressed']} vs {p5['bytes_up_identity']}.")
        out.append("")
    out += ["### Goals", ""] + goals(res)
    return "\n".join(out)
