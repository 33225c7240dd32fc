"""W1 / W2 as a plain Flower 1.42 FedAvg app, written the way Flower's own examples write it.

    python benchmarks/flower_plain.py w1 [threads]   # prints one JSON line (like baselines.py)

A `ServerApp` whose main runs `flwr.serverapp.strategy.FedAvg.start`, a PyTorch `ClientApp`
(a fresh `nn.Module` per call, `DataLoader` over the node's partition, `torch.optim.SGD`),
run by `flwr.simulation.run_simulation` on the Ray backend with one CPU per client. Same model
(MLP 60-64-10), data (fedsim's generator, dumped once to benchmarks/out/data_<w>.npz by
workload_data.py), local steps, batch and lr as the fedsim scenarios; FedAvg samples
`fraction_train` of the nodes each round (W2: 100 of 1000).

Reported: in_loop_s = FedAvg.start (first round to last; Ray and the actors are up by then
except for actor warm-up inside round 1), final test accuracy of the global model.
The app lives in this importable module (not __main__) so that Ray's workers import it and
keep the per-process data cache, as Flower's examples' `task.py` does.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from workload_data import Net, dump, load, train_steps  # noqa: E402
from workload_data import client as client_rows

WORKLOADS = {"w1": dict(clients=100, per_round=100, rounds=10, steps=10, batch=32, lr=0.05),
             "w2": dict(clients=1000, per_round=100, rounds=5, steps=10, batch=32, lr=0.05)}
_DATA: dict[str, dict[str, np.ndarray]] = {}


def data(path: str) -> dict[str, np.ndarray]:
    """The workload's arrays, loaded once per process (Flower examples cache their dataset)."""
    if path not in _DATA:
        _DATA[path] = load(path)
    return _DATA[path]


def train_reply(msg, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int,
                lr: float):
    """A PyTorch ClientApp's train answer, as Flower's examples write it: the message's weights
    into `net`, `steps` SGD steps over a shuffled DataLoader of (x, y), weights and metrics back."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from torch.utils.data import DataLoader, TensorDataset

    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)
    mean_loss = train_steps(net, loader, steps, lr)
    metrics = MetricRecord({"train_loss": mean_loss, "num-examples": len(y)})
    return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}), reply_to=msg)


def make_apps():
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        x, y = client_rows(data(str(cfg["data"])), int(context.node_config["partition-id"]))
        return train_reply(msg, Net(), torch.from_numpy(x), torch.from_numpy(y), int(cfg["batch"]),
                           int(cfg["steps"]), float(cfg["lr"]))

    return client_app


def make_server(workload: str, path: str, result: dict):
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    w = WORKLOADS[workload]
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        strategy = FedAvg(fraction_train=w["per_round"] / w["clients"], fraction_evaluate=0.0,
                          min_train_nodes=w["per_round"], min_available_nodes=w["clients"])
        cfg = ConfigRecord({"lr": w["lr"], "steps": w["steps"], "batch": w["batch"], "data": path})
        t0 = time.perf_counter()
        res = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                             num_rounds=w["rounds"], train_config=cfg)
        result["in_loop_s"] = time.perf_counter() - t0
        net = Net()
        net.load_state_dict(res.arrays.to_torch_state_dict())
        d = data(path)
        with torch.no_grad():
            pred = net(torch.from_numpy(d["x_test"])).argmax(1).numpy()
        result["final_test_accuracy"] = float((pred == d["y_test"]).mean())

    return server_app


def simulate(server_app, client_app, clients: int, threads: int | None, paths: list[str]) -> None:
    """`run_simulation` on Ray with 1 CPU per client; `paths` go on the workers' PYTHONPATH."""
    from flwr.simulation import run_simulation

    if threads:
        torch.set_num_threads(threads)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, os.environ.get("PYTHONPATH")]))
    run_simulation(server_app, client_app, clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})


def cli(main) -> None:
    """`python <script> WORKLOAD [threads]`: run `main(WORKLOAD, threads)`, print one JSON line."""
    name = sys.argv[1]
    res = main(name, int(sys.argv[2]) if len(sys.argv) > 2 else None)
    print(json.dumps({"impl": "flower", "workload": name, "in_loop_s": round(res["in_loop_s"], 4),
                      "final_test_accuracy": round(res["final_test_accuracy"], 4)}))


def main(workload: str, threads: int | None) -> dict:
    import flower_plain  # the importable copy of this module: Ray workers import it by name

    path = os.path.join(HERE, "out", f"data_{workload}.npz")
    if not os.path.exists(path):
        dump(workload, path)
    result: dict = {}
    simulate(flower_plain.make_server(workload, path, result), flower_plain.make_apps(),
             WORKLOADS[workload]["clients"], threads, [HERE])
    return result


if __name__ == "__main__":
    cli(main)
