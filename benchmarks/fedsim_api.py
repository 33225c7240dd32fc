"""A W6-W8 scenario run the way `fedsim run` runs it, in-process, printing one JSON line.

    python benchmarks/fedsim_api.py w7 [--set engine.plan=stacked ...]

The steps of `fedsim.run.execute` (build_setup, engine.prepare as set-up, engine.run timed as
summary.json's wall_s) without writing a run folder, plus the token-id shim of
`model_workloads.int_tokens_shim`. Prints in-loop wall and CPU seconds, set-up seconds, the
final test accuracy and the execution plan (kind:block, FLOPs and activation MB per client step).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> None:
    from model_workloads import int_tokens_shim, scenario

    from fedsim.engines import ENGINES

    int_tokens_shim()
    import fedsim.setup as fsetup

    t_start = time.perf_counter()
    sc = scenario(argv[0], [argv[i + 1] for i, a in enumerate(argv) if a == "--set"])
    setup = fsetup.build_setup(sc)
    engine = ENGINES.build(sc.engine.kind, sc.engine.params())
    engine.prepare(setup)
    setup_s = time.perf_counter() - t_start
    history: list[dict] = []
    t0, c0 = time.perf_counter(), time.process_time()
    engine.run(setup, history.append)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    plan = engine.summary_extra().get("plan") or {}
    print(json.dumps({"in_loop_s": round(wall, 4), "in_loop_cpu_s": round(cpu, 4), "setup_s": round(setup_s, 4),
                      "test_accuracy": history[-1]["test_accuracy"], "plan": f"{plan.get('kind')}:{plan.get('block')}",
                      "flops_per_client_step": plan.get("flops"), "act_mb_per_client": plan.get("act_mb_per_client"),
                      "chunk": getattr(getattr(engine, "loop", None), "chunk", None)}))


if __name__ == "__main__":
    main(sys.argv[1:])
