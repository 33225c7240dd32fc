"""Build everything a run needs from a validated scenario (shared by all engines)."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from fedsim.config import TOP_KEYS, Scenario
from fedsim.data import Dataset, label_distribution, load_dataset, partition
from fedsim.errors import ConfigError
from fedsim.models import StackedModel, build_model, init_params
from fedsim.oracle import ClientData, device_inputs
from fedsim.participation import build_participation
from fedsim.problem import DataProblem
from fedsim.types import Strategy, StrategyRuntime


@dataclass
class Setup:
    """The built scenario: data, model, strategy, participation, topology."""

    scenario: Scenario
    dataset: Dataset
    parts: list[np.ndarray]
    sizes: np.ndarray
    model: StackedModel
    make_module: Any
    x0: torch.Tensor            # [P] initial global model
    strategy: Strategy
    participation: Any
    topology: Any | None
    device: torch.device
    dtype: torch.dtype
    _problem: DataProblem | None = field(default=None, init=False, repr=False, compare=False)

    def problem(self) -> DataProblem:
        """The scenario's data and model as a `fedsim.problem.Problem` (data moved to the device
        on the first call; later calls share it)."""
        if self._problem is None:
            ds, sc = self.dataset, self.scenario
            data = ClientData.from_parts(ds.x_train, ds.y_train, self.parts, self.device, self.dtype)
            self._problem = DataProblem(
                self.model, data, device_inputs(ds.x_test, self.device, self.dtype),
                torch.as_tensor(ds.y_test, dtype=torch.int64, device=self.device),
                self.sizes, sc.seed, sc.strategy.batch_size, sc.eval.batch_size)
        return self._problem

    @property
    def num_clients(self) -> int:
        return len(self.parts)

    def initial_models(self, ids: torch.Tensor) -> torch.Tensor:
        """x0 of clients `ids`: [P] (shared init) or [m, P] (independent per-client inits)."""
        if self.scenario.model.init == "shared":
            return self.x0
        rows = init_params(self.make_module, self.model.spec, self.scenario.seed,
                           ids=[int(i) for i in ids.tolist()])
        return rows.to(self.device, self.dtype)


@contextmanager
def _located(file: str | None, prefix: str) -> Iterator[None]:
    """Re-raise ConfigErrors from a plug-in factory with the file and section key path."""
    try:
        yield
    except ConfigError as err:
        if err.key and err.key.split(".")[0] in TOP_KEYS:
            raise err.at(file=file) from None
        raise err.at(file=file, prefix=prefix) from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine", key="engine.device", value=name,
                          allowed="cpu or auto")
    return torch.device(name)


def build_setup(sc: Scenario) -> Setup:
    """Data, partition, model, strategy, participation and topology of scenario `sc`."""
    from strategies import STRATEGIES
    from topologies import build_topology

    device = resolve_device(sc.engine.device)
    dtype = torch.float64 if sc.engine.dtype == "float64" else torch.float32
    n = sc.data.clients
    with _located(sc.source, "data"):
        ds = load_dataset(sc.data.dataset, sc.data.params(), num_clients=n, seed=sc.seed)
    with _located(sc.source, "data.partition"):
        parts = partition(sc.data.partition.kind, sc.data.partition.params(), ds,
                          num_clients=n, seed=sc.seed)
    with _located(sc.source, "model"):
        make = lambda: build_model(sc.model.kind, sc.model.params(),  # noqa: E731
                                   input_shape=ds.feature_shape, num_classes=ds.num_classes)
        model = StackedModel(make().to(dtype))
        x0 = init_params(make, model.spec, sc.seed).to(device, dtype)
    with _located(sc.source, "participation"):
        participation = build_participation(
            sc.participation.kind, sc.participation.params(), num_clients=n, seed=sc.seed,
            label_dist=label_distribution(ds.y_train, parts, ds.num_classes))
    with _located(sc.source, "topology"):
        topology = build_topology(sc.topology.kind, sc.topology.params(), n=n, seed=sc.seed)
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    runtime = StrategyRuntime(num_clients=n, segments=tuple(model.spec.segments()),
                              num_samples=sizes, seed=sc.seed,
                              probabilities=getattr(participation, "probabilities", None),
                              p_nominal=getattr(participation, "p_nominal", None))
    with _located(sc.source, "strategy"):
        factory = STRATEGIES.get(sc.strategy.name)
        extra = {"runtime": runtime} if "runtime" in inspect.signature(factory).parameters else {}
        params = sc.strategy.params()
        uplink = None if "compressor" in STRATEGIES.params(sc.strategy.name) \
            else params.pop("compressor", None)
        strategy = STRATEGIES.build(sc.strategy.name, params, **extra)
        if uplink is not None:
            from strategies.compress import compress_uplink

            strategy = compress_uplink(strategy, uplink, runtime)
        if strategy.comm == "mix" and sc.participation.kind != "full":
            raise ConfigError("gossip strategies need every node every round",
                              key="participation.kind", value=sc.participation.kind, allowed="full")
    return Setup(sc, ds, parts, sizes, model, make, x0, strategy, participation, topology,
                 device, dtype)
