"""`fedsim run` of a W6-W8 scenario in-process, printing one JSON line (for models_run.py).

    python benchmarks/fedsim_api.py w7 [--set engine.plan=stacked ...]

The same `fedsim.run.execute` as the CLI (no run folder written), plus the token-id shim of
`model_workloads.int_tokens_shim`; prints in-loop seconds (summary wall_s), set-up seconds,
test accuracy and the chosen execution plan.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> None:
    from fedsim.config import load_scenario
    from fedsim.run import execute
    from model_workloads import HERE, int_tokens_shim

    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    sc = load_scenario(os.path.join(HERE, "scenarios", f"{argv[0]}.yaml"), sets)
    int_tokens_shim()
    _, s = execute(sc, quiet=True, write=False)
    plan = s.get("plan") or {}
    print(json.dumps({"in_loop_s": s["wall_s"], "setup_s": s["setup_s"],
                      "test_accuracy": s["final"]["test_accuracy"], "plan": f"{plan.get('kind')}:{plan.get('block')}",
                      "flops_per_client_step": plan.get("flops"), "act_mb_per_client": plan.get("act_mb_per_client")}))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1:])
