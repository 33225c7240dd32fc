"""W6 (and W7/W8) as a plain Flower FedAvg app (flwr 1.42, the pinned version), the way `flower_plain.py` runs W1/W2.

    python benchmarks/flower_models.py w6 [threads]   # prints one JSON line

`ServerApp` + `flwr.serverapp.strategy.FedAvg.start`, a PyTorch `ClientApp` (fresh model from
the same factory, `DataLoader` over the node's rows, `torch.optim.SGD` via
`workload_data.train_steps`), `flwr.simulation.run_simulation` on Ray with one CPU per client.
Data: `model_workloads.load` (generated in each Ray worker once, as Flower examples cache their
partitions). in_loop_s = FedAvg.start plus the final test evaluation.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from flower_plain import cli, simulate, train_reply  # noqa: E402
from model_workloads import load  # noqa: E402

_DATA: dict[str, dict[str, Any]] = {}


def data(workload: str) -> dict[str, Any]:
    if workload not in _DATA:
        _DATA[workload] = load(workload)
    return _DATA[workload]


def make_apps():
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        w = data(str(cfg["workload"]))
        torch.set_num_threads(1)
        i, n = int(context.node_config["partition-id"]), int(w["sizes"][0])
        x, y = torch.as_tensor(w["x"][i * n:(i + 1) * n]), torch.as_tensor(w["y"][i * n:(i + 1) * n])
        return train_reply(msg, w["make"](), x, y, w["batch"], w["steps"], w["lr"])

    return client_app


def make_server(workload: str, result: dict):
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        w = data(workload)
        torch.manual_seed(0)
        strategy = FedAvg(fraction_train=w["per_round"] / w["clients"], fraction_evaluate=0.0,
                          min_train_nodes=w["per_round"], min_available_nodes=w["clients"])
        t0 = time.perf_counter()
        res = strategy.start(grid=grid, initial_arrays=ArrayRecord(w["make"]().state_dict()),
                             num_rounds=w["rounds"], train_config=ConfigRecord({"workload": workload}))
        net = w["make"]()
        net.load_state_dict(res.arrays.to_torch_state_dict())
        from model_baselines import accuracy

        result["final_test_accuracy"] = accuracy(net, w, torch.as_tensor(w["x_test"]),
                                                 torch.as_tensor(w["y_test"]))
        result["in_loop_s"] = time.perf_counter() - t0

    return server_app


def main(workload: str, threads: int | None) -> dict:
    import flower_models  # the importable copy of this module: Ray workers import it by name

    result: dict = {}
    simulate(flower_models.make_server(workload, result), flower_models.make_apps(),
             data(workload)["clients"], threads, [HERE, os.path.dirname(HERE)])
    return result


if __name__ == "__main__":
    cli(main)
