"""Run under `mpiexec -n K`: Flower apps on fedsim's MPI runtime (one launch, several runs).

    mpiexec -n 3 python tests/flower_apps/mpi_check.py OUT_DIR SCENARIO.yaml...

1. the unmodified digits FedAvg app (`fedsim flower-run ... --runtime mpi`), final model saved
   to OUT_DIR/digits.pt;
2. each scenario with `engine: {kind: flower, runtime: mpi}`; rank 0 writes
   OUT_DIR/<scenario name>.json = {"history": [...], "final": [...]}.
"""

from __future__ import annotations

import json
import os
import sys

import torch

torch.set_num_threads(1)


def main(out: str, scenarios: list[str]) -> None:
    from mpi4py import MPI

    from fedsim.config import load_scenario
    from fedsim.engines import ENGINES
    from fedsim.flower.runtime import run_app
    from fedsim.setup import build_setup
    from tests.flower_apps.digits_client import app as client_app
    from tests.flower_apps.digits_server import fedavg

    run_app(fedavg, client_app, 6, runtime="mpi",
            run_config={"num-server-rounds": 2, "final-model": os.path.join(out, "digits.pt")})
    for path in scenarios:
        sc = load_scenario(path, extra={"engine": {"kind": "flower", "runtime": "mpi"}})
        engine = ENGINES.build("flower", sc.engine.params())
        history = engine.run(build_setup(sc), on_eval=lambda m: None)
        if MPI.COMM_WORLD.Get_rank() == 0:
            a = engine.adapter
            x = a.server[a.strategy.model_key] if a.strategy.comm == "reduce" else a.node_models
            with open(os.path.join(out, f"{sc.name}.json"), "w") as fh:
                json.dump({"history": history, "final": x.tolist()}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
