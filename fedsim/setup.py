"""Build everything a run needs from a validated scenario (shared by all engines)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsim.config import TOP_KEYS, Scenario
from fedsim.config_system import ROUND_KEYS, first_set
from fedsim.data import ClientSplits, Dataset, client_splits, label_distribution, load_dataset
from fedsim.errors import ConfigError
from fedsim.models import StackedModel, build_model, init_params
from fedsim.oracle import ClientData, device_inputs, model_batch
from fedsim.participation import build_participation
from fedsim.problem import DataProblem
from fedsim.round import plan_round
from fedsim.setup_checks import (
    MemoryEstimate,
    check_finite_data,
    check_topology,
    estimate_clients,
    estimate_inputs,
    estimate_model,
    model_size,
)
from fedsim.system import SystemModel, flops_per_sample
from fedsim.types import Strategy, StrategyRuntime
from fedsim.work import WORK, LocalWork


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
    splits: ClientSplits | None = None  # each client's own test split (per-client metrics)
    work: LocalWork | None = None       # heterogeneous local work (None: strategies' own steps)
    system: SystemModel | None = None   # the simulated system (speeds, links, stragglers)
    _problem: DataProblem | None = field(default=None, init=False, repr=False, compare=False)

    def problem(self) -> DataProblem:
        """The scenario's data and model as a `fedsim.problem.Problem` (data moved to the device
        on the first call; later calls share it)."""
        if self._problem is None:
            ds, sc = self.dataset, self.scenario
            data = ClientData.from_parts(ds.x_train, ds.y_train, self.parts, self.device, self.dtype,
                                         ds.normalize)
            prob = DataProblem(
                self.model, data, device_inputs(ds.x_test, self.device, self.dtype),
                torch.as_tensor(ds.y_test, dtype=torch.int64, device=self.device),
                self.sizes, sc.seed, sc.strategy.batch_size, sc.eval.batch_size,
                nonconvex_reg=sc.model.nonconvex_reg)
            if self.splits is not None and self.splits.test is not None:
                x, y = self.splits.test_arrays(ds)  # stored compactly, like the training rows
                prob.client_test = ClientData.from_parts(x, y, self.splits.test, self.device, self.dtype,
                                                         ds.normalize)
                prob.client_test_covers = self.splits.partitions_test(len(ds.y_test))
            self._problem = prob
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
    """Re-raise ConfigErrors from a plug-in factory with the file and section key path.

    An error that names its own file (a data file) keeps it: the scenario is not the culprit.
    """
    try:
        yield
    except ConfigError as err:
        where = err.file or file
        if err.key and err.key.split(".")[0] in TOP_KEYS:
            raise err.at(file=where) from None
        raise err.at(file=where, prefix=prefix) from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine", key="engine.device", value=name,
                          allowed="cpu or auto")
    return torch.device(name)


def _adversarial(strategy: Strategy, sc: Scenario, aggregator: Any, participation: Any) -> Strategy:
    """The scenario's Byzantine clients (`attack:`, `fedsim.attacks`) around the strategy's uplink,
    then its robust aggregator (`strategy.aggregator`, `fedsim.robust`), checked against the
    participants per round where the pattern fixes them (full, uniform)."""
    from fedsim.attacks import ATTACKS, with_attack
    from fedsim.robust import fixed_participants, with_aggregator

    with _located(sc.source, "attack"):
        attack = ATTACKS.build(sc.attack.kind, sc.attack.params(), num_clients=sc.data.clients, seed=sc.seed)
    try:
        strategy = strategy if attack is None else with_attack(strategy, attack)
    except ValueError as exc:
        raise ConfigError(str(exc).partition(": ")[2], key="attack.kind", value=sc.attack.kind) from None
    if aggregator is None:
        return strategy
    try:
        strategy = with_aggregator(strategy, aggregator)
    except ValueError as exc:
        raise ConfigError(str(exc).partition(": ")[2], key="strategy.aggregator",
                          value=aggregator.spec["name"]) from None
    m = fixed_participants(sc.participation.kind, participation)
    bad = None if m is None else aggregator.fits(m)
    if bad is not None:
        raise ConfigError(bad[1], key=f"strategy.aggregator.{bad[0]}", value=aggregator.spec.get(bad[0]))
    return strategy


def build_setup(sc: Scenario) -> Setup:
    """Data, partition, model, strategy, participation and topology of scenario `sc`."""
    from strategies import STRATEGIES
    from strategies.uplink import compress_uplink
    from topologies import build_topology

    device = resolve_device(sc.engine.device)
    dtype = torch.float64 if sc.engine.dtype == "float64" else torch.float32
    n = sc.data.clients
    mem = MemoryEstimate(sc.source)
    estimate_inputs(sc, mem)
    with _located(sc.source, "data"):
        ds = load_dataset(sc.data.dataset, sc.data.params(), num_clients=n, seed=sc.seed)
    check_finite_data(ds, sc.source)
    with _located(sc.source, "data.partition"):
        splits = client_splits(sc.data.partition.kind, sc.data.partition.params(), ds,
                               num_clients=n, seed=sc.seed)
        parts = splits.train
    with _located(sc.source, "model"):
        make = lambda: build_model(sc.model.kind, sc.model.params(),  # noqa: E731
                                   input_shape=ds.feature_shape, num_classes=ds.num_classes)
        num_params = model_size(make)
        elem = 8 if dtype == torch.float64 else 4
        if num_params is not None:
            estimate_model(sc, num_params, elem, mem,
                           f" for inputs {ds.feature_shape} and {ds.num_classes} classes (from the data)")
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
    if sc.strategy.name == "flower":  # a Flower strategy object on the server: fedsim.flower.plugin
        from fedsim.flower.plugin import client_strategy
        if sc.attack.kind != "none":
            raise ConfigError("attacks apply to fedsim's own server strategies", file=sc.source,
                              key="attack.kind", value=sc.attack.kind,
                              allowed="none with strategy.name: flower")
        with _located(sc.source, "strategy"):
            strategy = client_strategy(sc)
        refuse_server_system(sc, "a Flower strategy samples its clients itself: fedsim's straggler "
                             "model does not apply")
        if sc.work.kind != "strategy":
            raise ConfigError("a Flower strategy sets its clients' local work itself", file=sc.source,
                              key="work.kind", value=sc.work.kind, allowed="strategy")
        check_topology(sc, strategy, topology)
        return Setup(sc, ds, parts, sizes, model, make, x0, strategy, participation, topology,
                     device, dtype, splits, None, build_system(sc, strategy, n, make, ds, parts, dtype))
    with _located(sc.source, "strategy"):
        params = sc.strategy.params()
        uplink = None if "compressor" in STRATEGIES.params(sc.strategy.name) \
            else params.pop("compressor", None)
        aggregator = None if "aggregator" in STRATEGIES.params(sc.strategy.name) \
            else params.pop("aggregator", None)
        strategy = STRATEGIES.build(sc.strategy.name, params, runtime=runtime)
        if not isinstance(strategy, Strategy):
            raise ConfigError(f"the strategy factory returned a {type(strategy).__name__}, not a "
                              "fedsim.types.Strategy", key="name", value=sc.strategy.name)
        if uplink is not None:
            try:
                strategy = compress_uplink(strategy, uplink)
            except ValueError as exc:
                raise ConfigError(str(exc).partition(": ")[2] or str(exc), key="compressor") from None
        if strategy.comm == "mix" and sc.participation.kind != "full":
            raise ConfigError("gossip strategies need every node every round",
                              key="participation.kind", value=sc.participation.kind, allowed="full")
        strategy = _adversarial(strategy, sc, aggregator, participation)
    check_topology(sc, strategy, topology)
    estimate_clients(sc, strategy, model.spec.size, elem, mem)
    work = None
    if sc.work.kind != "strategy":
        if not strategy.trains_locally:
            raise ConfigError(f"{sc.strategy.name} takes one gradient per round: local work does not apply",
                              key="work.kind", value=sc.work.kind, allowed="strategy")
        with _located(sc.source, "work"):
            work = WORK.build(sc.work.kind, sc.work.params(), num_clients=n, seed=sc.seed, sizes=sizes,
                              batch_size=sc.strategy.batch_size)
    system = build_system(sc, strategy, n, make, ds, parts, dtype)
    if sc.system.deadline is not None and strategy.comm == "reduce":
        server = strategy.init_server(x0)
        plan = plan_round(strategy, system, work, 0, np.ones(n, dtype=bool), sizes,
                          sc.strategy.batch_size, server, model.spec.size)
        if not plan.mask.any():
            raise ConfigError("no client can finish a round within the deadline", file=sc.source,
                              key="system.deadline.seconds", value=sc.system.deadline.seconds,
                              allowed="a deadline some client meets (see system.speed, uplink, downlink)")
    return Setup(sc, ds, parts, sizes, model, make, x0, strategy, participation, topology,
                 device, dtype, splits, work, system)


def refuse_server_system(sc: Scenario, why: str) -> None:
    """ConfigError `why` naming the first `system:` setting of fedsim's own server rounds
    (stragglers: dropout, over_selection, deadline; the all-reduce network; asynchrony) that
    scenario `sc` moves off its default although its strategy would ignore it (gossip, a Flower
    strategy object)."""
    moved = first_set(sc.system, (*ROUND_KEYS, "asynchrony"))
    if moved is not None:
        raise ConfigError(why, file=sc.source, key=f"system.{moved[0]}", value=moved[1],
                          allowed="the default")


def build_system(sc: Scenario, strategy: Strategy, n: int, make: Any, ds: Dataset,
                 parts: list[np.ndarray], dtype: torch.dtype) -> SystemModel:
    """The simulated system of the scenario; FLOPs per sample measured on one training batch."""
    cfg = sc.system
    if strategy.comm == "mix":
        refuse_server_system(sc, "gossip nodes all take part every round: stragglers, all-reduce "
                             "networks and asynchrony apply to server strategies")
    if cfg.asynchrony is not None:
        from fedsim.engines.async_loop import check_async
        try:
            check_async(strategy)
        except ValueError as exc:
            key, _, msg = str(exc).partition(": ")
            raise ConfigError(msg, file=sc.source, key=key, value=cfg.asynchrony.model_dump(),
                              allowed="a server strategy without staleness or robust aggregation") from None

    def fps() -> float:  # measured on first use: building a scenario never runs the model
        rows = np.concatenate(parts)[: max(1, sc.strategy.batch_size or 32)] if parts else np.zeros(0, int)
        if not rows.size:
            return 0.0
        x = model_batch(ds, rows, dtype)
        return flops_per_sample(make().to(dtype), x, torch.as_tensor(ds.y_train[rows], dtype=torch.int64))
    try:
        return SystemModel(cfg, n, sc.seed, fps)
    except ValueError as exc:  # a per-client list of the wrong length
        key, _, msg = str(exc).partition(": ")
        raise ConfigError(msg, file=sc.source, key=key) from None
