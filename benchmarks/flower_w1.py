"""W1 through Flower: fedsim engines side by side with a plain Flower FedAvg app.

    python benchmarks/flower_w1.py                      # every variant, one table
    python benchmarks/flower_w1.py --variants multiplex,flower-inprocess --json out.json

Variants (each in its own process, one after the other):
  multiplex         fedsim's default engine (all clients of a round stacked)
  flower-inprocess  fedsim FedAvg as a Flower app on fedsim's Ray-free InProcessGrid
  flower-mpi        the same Flower app on fedsim's MpiGrid, `mpiexec -n 2` (nodes split in 2)
  flower-ray        the same Flower app on Flower's simulation (Ray), 1 CPU per ClientApp
  plain-ray         FedAvg written as Flower's examples write it (ServerApp with
                    flwr.serverapp.strategy.FedAvg, PyTorch ClientApp), run_simulation, 1 CPU/client
  plain-inprocess   the same unmodified plain app on fedsim's InProcessGrid (`fedsim flower-run`)
All train W1 (benchmarks/scenarios/w1.yaml: MLP 60-64-10, 100 clients, full participation,
10 rounds x 10 local SGD steps of batch 32, lr 0.05) on the same data (fedsim's generator).
Reported: wall_s (whole run, incl. runtime start), train_s (first round to last), accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workload_data import Net, train_steps  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W1 = os.path.join(ROOT, "benchmarks", "scenarios", "w1.yaml")
VARIANTS = ("multiplex", "flower-inprocess", "flower-mpi", "flower-ray", "plain-ray",
            "plain-inprocess")
_DATA: dict[str, object] = {}


# ---- the plain Flower app (Flower's quickstart style) --------------------------------------------
def w1_data() -> dict:
    """W1's clients (natural split of the LEAF-style synthetic data) and test set."""
    if not _DATA:
        from fedsim.config import load_scenario
        from fedsim.data import load_dataset, partition

        sc = load_scenario(W1)
        ds = load_dataset(sc.data.dataset, sc.data.params(), num_clients=sc.data.clients, seed=sc.seed)
        parts = partition(sc.data.partition.kind, sc.data.partition.params(), ds,
                          num_clients=sc.data.clients, seed=sc.seed)
        _DATA.update(x=torch.as_tensor(ds.x_train), y=torch.as_tensor(ds.y_train), parts=parts,
                     xt=torch.as_tensor(ds.x_test), yt=torch.as_tensor(ds.y_test))
    return _DATA


def make_plain_apps(rounds: int = 10, steps: int = 10, batch: int = 32, lr: float = 0.05):
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from torch.utils.data import DataLoader, TensorDataset

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        net = Net()
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        d = w1_data()
        idx = torch.as_tensor(d["parts"][context.node_config["partition-id"]])
        loader = DataLoader(TensorDataset(d["x"][idx], d["y"][idx]), batch_size=batch, shuffle=True)
        metrics = MetricRecord({"train_loss": train_steps(net, loader, steps, lr),
                                "num-examples": len(idx)})
        return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}),
                       reply_to=msg)

    server_app = ServerApp()
    result: dict = {}

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        n = len(w1_data()["parts"])
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                          min_available_nodes=n)
        t0 = time.perf_counter()
        res = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                             num_rounds=rounds)
        result["train_s"] = time.perf_counter() - t0
        net = Net()
        net.load_state_dict(res.arrays.to_torch_state_dict())
        with torch.no_grad():
            out = net(w1_data()["xt"])
        result["test_accuracy"] = float((out.argmax(1) == w1_data()["yt"]).double().mean())

    return server_app, client_app, result


# ---- one variant ----------------------------------------------------------------------------
def run_variant(name: str) -> dict:
    t0 = time.perf_counter()
    if name.startswith("plain"):
        server_app, client_app, result = make_plain_apps()
        n = len(w1_data()["parts"])
        if name == "plain-ray":
            from flwr.simulation import run_simulation

            run_simulation(server_app, client_app, n,
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
        else:
            from fedsim.flower.runtime import run_app

            run_app(server_app, client_app, n, runtime="inprocess")
        return {"variant": name, "wall_s": time.perf_counter() - t0, **result}
    from fedsim.config import load_scenario
    from fedsim.run import execute

    engine = {"multiplex": {"kind": "multiplex"},
              "flower-inprocess": {"kind": "flower", "runtime": "inprocess"},
              "flower-mpi": {"kind": "flower", "runtime": "mpi"},
              "flower-ray": {"kind": "flower", "runtime": "ray",
                             "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}}[name]
    sc = load_scenario(W1, extra={"engine": engine})
    _, summary = execute(sc, quiet=True, write=False)
    if summary["final"]["test_accuracy"] is None:  # an MPI rank > 0
        return {}
    return {"variant": name, "wall_s": time.perf_counter() - t0, "train_s": summary["wall_s"],
            "test_accuracy": summary["final"]["test_accuracy"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args(argv)
    if args.one:
        row = run_variant(args.one)
        if row:
            print("ROW " + json.dumps(row), flush=True)
        return 0
    rows = []
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, "--one", v]
        if v == "flower-mpi":
            mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
            root = ["--allow-run-as-root"] if os.geteuid() == 0 else []  # Open MPI flags
            cmd = [mpiexec, "--oversubscribe", *root, "-n", "2", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")]
        if out.returncode or not line:
            print(f"{v}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[-1][4:]))
        r = rows[-1]
        print(f"{v:17s} wall {r['wall_s']:7.2f} s  train {r['train_s']:7.2f} s  "
              f"acc {r['test_accuracy']:.4f}", flush=True)
    base = next((r["train_s"] for r in rows if r["variant"] == "multiplex"), None)
    print("\n| variant | wall s (incl. start) | train s | x multiplex (train) | test acc |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['train_s'] / base:.1f}" if base else "-"
        print(f"| {r['variant']} | {r['wall_s']:.2f} | {r['train_s']:.2f} | {ratio} | "
              f"{r['test_accuracy']:.4f} |")
    print(f"\nload average at end: {os.getloadavg()}, cpus: {os.cpu_count()}, torch {torch.__version__}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
