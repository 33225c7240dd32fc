"""W2 on Apple's pfl 0.6 (its simulated backend), in one process or several via torchrun.

    benchmarks/.venv-pfl/bin/python benchmarks/pfl_w2.py [threads]
    benchmarks/.venv-pfl/bin/torchrun --standalone --nnodes=1 --nproc_per_node=2 benchmarks/pfl_w2.py 1

Runs in its own venv (pfl pins its own dependencies; fedsim's venv stays untouched):
    python3 -m venv benchmarks/.venv-pfl
    benchmarks/.venv-pfl/bin/pip install torch==2.13.0 "pfl[pytorch]==0.6.0"
and reads W2's data from benchmarks/out/data_w2.npz (written by workload_data.py with fedsim's
generator; this script imports numpy only from outside pfl).

Same math as the other W2 implementations: MLP 60-64-10, 1000 users, a cohort of 100 sampled
per round, 5 central iterations, 10 local SGD steps (2 epochs of the 160 samples, batch 32),
local lr 0.05, central SGD lr 1 on the averaged update (= FedAvg). With torchrun, pfl splits
each cohort across the processes and all-reduces the update. Rank 0 prints one JSON line:
{"impl", "workload", "in_loop_s" (FederatedAveraging.run), "final_test_accuracy"}.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from workload_data import Net as MLP
from workload_data import client, load

USERS, COHORT, ROUNDS, EPOCHS, BATCH, LR = 1000, 100, 5, 2, 32, 0.05


class Net(MLP):
    """The workloads' MLP with the loss/metrics methods pfl's PyTorchModel calls."""

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:
        return nn.functional.cross_entropy(self(x), y.long())

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = True) -> dict:
        from pfl.metrics import Weighted

        return {"loss": Weighted(float(nn.functional.cross_entropy(self(x), y.long(), reduction="sum")),
                                 len(y))}


def main(threads: int | None) -> dict | None:
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.model.pytorch import PyTorchModel

    if threads:
        torch.set_num_threads(threads)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    d = load(os.path.join(HERE, "out", "data_w2.npz"))
    slices = {u: list(client(d, u)) for u in range(USERS)}
    fed = FederatedDataset.from_slices(slices, get_user_sampler("random", list(range(USERS))))
    val = FederatedDataset.from_slices(slices, get_user_sampler("random", list(range(USERS))))
    net = Net()
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), 1.0))
    backend = SimulatedBackend(training_data=fed, val_data=val)
    params = NNAlgorithmParams(central_num_iterations=ROUNDS, evaluation_frequency=10**9,
                               train_cohort_size=COHORT, val_cohort_size=0)
    t0 = time.perf_counter()
    FederatedAveraging().run(
        algorithm_params=params, backend=backend, model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=LR, local_num_epochs=EPOCHS,
                                              local_batch_size=BATCH),
        model_eval_params=NNEvalHyperParams(local_batch_size=256), send_metrics_to_platform=False)
    dt = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    with torch.no_grad():
        pred = net(torch.from_numpy(d["x_test"])).argmax(1).numpy()
    return {"impl": f"pfl-{os.environ.get('WORLD_SIZE', '1')}p", "workload": "w2",
            "in_loop_s": round(dt, 4), "final_test_accuracy": round(float((pred == d["y_test"]).mean()), 4)}


if __name__ == "__main__":
    res = main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
    if res:
        print(json.dumps(res), flush=True)
