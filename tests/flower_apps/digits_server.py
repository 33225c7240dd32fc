"""ServerApps of the digits app with Flower's own FedAvg, FedProx and FedAdam (unmodified).

run_config keys (all optional): num-server-rounds, fraction-train, lr, proximal-mu,
final-model (a path: the final global model is saved there with torch.save).
"""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from tests.flower_apps.digits_task import Net, load_centralized_test, test


def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, acc = test(model, load_centralized_test())
    return MetricRecord({"accuracy": acc, "loss": loss})


def make_app(kind: str) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = context.run_config
        fraction = float(cfg.get("fraction-train", 0.5))
        common = dict(fraction_train=fraction, fraction_evaluate=0.0)
        strategy = {"fedavg": lambda: FedAvg(**common),
                    "fedprox": lambda: FedProx(**common, proximal_mu=float(cfg.get("proximal-mu", 0.1))),
                    "fedadam": lambda: FedAdam(**common, eta=0.05, eta_l=0.1)}[kind]()
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                                train_config=ConfigRecord({"lr": float(cfg.get("lr", 0.1))}),
                                num_rounds=int(cfg.get("num-server-rounds", 3)),
                                evaluate_fn=global_evaluate)
        if cfg.get("final-model"):
            torch.save(result.arrays.to_torch_state_dict(), str(cfg["final-model"]))

    return app


fedavg = make_app("fedavg")
fedprox = make_app("fedprox")
fedadam = make_app("fedadam")
