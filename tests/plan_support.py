"""Helpers for the execution-plan tests: small problems over token ids and images, and runs."""

from __future__ import annotations

import numpy as np
import torch

from fedsim.config import parse_scenario
from fedsim.engines.loop import RoundLoop
from fedsim.models import StackedModel, build_model, init_params
from fedsim.oracle import ClientData, device_inputs
from fedsim.problem import DataProblem
from fedsim.setup import build_setup
from tests.conftest import small_scenario


def token_problem(kind: str, params: dict, *, clients: int = 6, t: int = 7, vocab: int = 10,
                  per: int = 12, batch: int | None = 4, device: str = "cpu",
                  dtype: torch.dtype = torch.float64) -> tuple[DataProblem, torch.Tensor]:
    """A DataProblem over int64 token sequences [n, t] (next-token labels) and its x0 [P]."""
    rs = np.random.RandomState(0)
    n = clients * per
    x, y = rs.randint(0, vocab, (n + 20, t)), rs.randint(0, vocab, n + 20)
    make = lambda: build_model(kind, params, input_shape=(t,), num_classes=vocab).to(dtype)  # noqa: E731
    model = StackedModel(make())
    parts = [np.arange(i * per, (i + 1) * per) for i in range(clients)]
    data = ClientData.from_parts(x[:n], y[:n], parts, device, dtype)
    problem = DataProblem(model, data, device_inputs(x[n:], device, dtype),
                          torch.as_tensor(y[n:], device=device), np.full(clients, per), 0, batch)
    return problem, init_params(make, model.spec, 0).to(device, dtype)


def run_problem(problem: DataProblem, x0: torch.Tensor, plan: str, block: int | None,
                chunk: int | None = None, rounds: int = 2) -> tuple[torch.Tensor, list[dict]]:
    """FedAvg (3 local steps, 4 of 6 clients per round) on `problem` with the given plan."""
    from fedsim.participation import build_participation
    from strategies import STRATEGIES

    problem.choose_plan(plan, block)
    strat = STRATEGIES.build("fedavg", {"lr": 0.1, "local_steps": 3})
    part = build_participation("uniform", {"clients_per_round": 4}, num_clients=problem.num_clients,
                               seed=0, label_dist=None)
    loop = RoundLoop(strat, problem, x0, rounds=rounds, seed=0, participation=part, chunk_size=chunk)
    hist = loop.run()
    return loop.state.server["x"], hist


def run_scenario(plan: str, block: int | None, chunk: int | None = None, device: str = "cpu",
                 **over) -> tuple[torch.Tensor, list[dict], RoundLoop]:
    """A small scenario (tests.conftest.small_scenario + overrides) run with the given plan."""
    sc = small_scenario(**over)
    sc["engine"] = {**sc["engine"], "device": device}
    loop = RoundLoop.from_setup(build_setup(parse_scenario(sc)), chunk_size=chunk, plan=plan,
                                plan_block=block)
    hist = loop.run()
    return loop.state.server["x"], hist, loop


def strip(hist: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "wall_s"} for m in hist]
