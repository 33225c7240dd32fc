"""A Flower strategy object driving fedsim's clients (`strategy: {name: flower, class: ...}`).

The ServerApp builds the strategy from the scenario (`fedsim.flower.plugin`), lets the nodes
join (`fedsim.flower.federation`), and runs Flower's own `Strategy.start` loop through
`SeededStrategy`, a thin `flwr.serverapp.strategy.Strategy` around it that

- seeds Python's `random`, numpy's and torch's global RNGs from (scenario seed, round, phase)
  around every call into the strategy, restoring them afterwards: Flower's node sampling
  (`random.sample` in `sample_nodes`) and the differential-privacy wrappers' noise are the same
  on every rerun with the same seed;
- counts the bytes: `bytes_down` / `bytes_up` by the round kernel's rule (the dense model per
  train message down, each reply's `up-bytes` up), `flower_bytes_*` what Flower moved;
- raises on an error reply (a failing node is a bug in a simulation, not a straggler);
- writes fedsim's metrics line (`fedsim.round.metrics_line`) on the evaluation rounds, from
  central evaluation of the global model, plus the strategy's aggregated client-side
  evaluation as `flower_eval_*`.

Everything a round *does* is Flower's strategy (sampling, aggregation, server optimiser) and
fedsim's client half (local SGD, `fedsim.flower.node.train_flower`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedsim import rng
from fedsim import round as kernel
from fedsim.flower.federation import Federation
from fedsim.flower.grid import seeded_globals
from fedsim.flower.plugin import build_flower_strategy, class_spec
from fedsim.flower.records import model_record, record_model
from fedsim.system import Clock, RoundRecord
from fedsim.types import OnEval, Progress

STRATEGY_RNG = rng.purpose_id("flower-strategy-rng")
CONFIGURE_TRAIN, AGGREGATE_TRAIN, CONFIGURE_EVALUATE, AGGREGATE_EVALUATE = range(4)


class SeededStrategy(FlowerStrategy):
    """`inner` (any Flower strategy) on fedsim's nodes; see the module docstring.

    After `start`, `server["x"]` is the final global model [P] and `history` the metrics lines.
    """

    def __init__(self, inner: FlowerStrategy, setup: Any, fed: Federation, *,
                 on_eval: OnEval | None = None, progress: Progress | None = None) -> None:
        self.inner, self.setup, self.fed = inner, setup, fed
        self.strategy = setup.strategy  # the client half (fedsim.flower.plugin.client_strategy)
        self.spec, self.seed = setup.model.spec, setup.scenario.seed
        self.on_eval: OnEval = on_eval or (lambda m: None)
        self.progress: Progress = progress or (lambda t, m: None)
        self.problem = setup.problem()
        x0 = setup.x0.to(setup.device, setup.dtype)
        self.server = {"x": x0}
        self.down_bytes = kernel.broadcast_bytes(self.strategy, self.server)
        self.bytes, self.train_loss = kernel.ByteCounter(), [0.0, 0.0]
        self.clock = Clock()
        self.client_eval: dict[str, float] = {}
        self._sent = 0  # train messages of the current round
        self.history: list[dict[str, Any]] = []
        self.t0, self.join_s = time.perf_counter(), 0.0

    @property
    def wire(self) -> list[int]:
        return self.fed.wire

    def _seeded(self, server_round: int, phase: int) -> Any:
        return seeded_globals(self.seed, STRATEGY_RNG, server_round, phase)

    def _checked(self, replies: Iterable[Message]) -> list[Message]:
        replies = self.fed.count_up(replies)
        for r in replies:
            if r.has_error():
                raise RuntimeError(f"Flower node {r.metadata.src_node_id} failed: {r.error.reason}")
        return replies

    # ---- Flower Strategy API (delegated) ---------------------------------------------------
    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        with self._seeded(server_round, CONFIGURE_TRAIN):
            msgs = self.fed.count_down(self.inner.configure_train(server_round, arrays, config, grid))
        self._sent = len(msgs)
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = self._checked(replies)
        up, pids, samples, sent = 0, [], [], []
        for r in replies:
            m = r.content["metrics"]
            up += int(cast(int, m["up-bytes"]))
            self.train_loss[0] += float(cast(float, m["loss"]))
            self.train_loss[1] += 1
            pids.append(self.fed.pid_of[r.metadata.src_node_id])
            samples.append(float(cast(float, m.get("samples", 0.0))))
            sent.append(float(cast(int, m["up-bytes"])))
        self.bytes.add(up, self.down_bytes * self._sent)
        record = RoundRecord()
        kernel.record_times(record, self.setup.system, self.strategy, server_round - 1,
                            np.asarray(pids, dtype=np.int64), np.asarray(samples), np.asarray(sent),
                            self.down_bytes)
        self.clock.advance(self.setup.system, record.maxima(), record.sums(), overlap=False,
                           collective=False)
        with self._seeded(server_round, AGGREGATE_TRAIN):
            arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is not None:
            self.server = {"x": record_model(arrays, self.spec, self.setup.device, self.setup.dtype)}
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        with self._seeded(server_round, CONFIGURE_EVALUATE):
            return self.fed.count_down(self.inner.configure_evaluate(server_round, arrays, config,
                                                                     grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = self._checked(replies)
        with self._seeded(server_round, AGGREGATE_EVALUATE):
            res = self.inner.aggregate_evaluate(server_round, replies)
        self.client_eval = {f"flower_{k}": v for k, v in (res or {}).items()
                            if isinstance(v, (int, float))}
        return res

    # ---- fedsim's metrics ------------------------------------------------------------------
    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """`evaluate_fn` for `start`: fedsim's metrics line on evaluation rounds."""
        if server_round == 0:
            return None
        t, sc = server_round - 1, self.setup.scenario
        m = None
        if kernel.eval_due(t, sc.eval.every, sc.rounds):
            x = record_model(arrays, self.spec, self.setup.device, self.setup.dtype)
            n = self.setup.num_clients
            test, per_client = kernel.evaluation(self.problem, x, torch.arange(n, device=x.device), n)
            m = kernel.metrics_line(t, self.train_loss[0], self.train_loss[1], test, self.bytes,
                                    self.clock.now)
            self.train_loss = [0.0, 0.0]
            m.update(per_client)
            m.update(self.client_eval)
            m["flower_bytes_up"], m["flower_bytes_down"] = self.fed.wire[1], self.fed.wire[0]
            m["wall_s"] = round(time.perf_counter() - self.t0, 4)
            self.history.append(m)
            self.on_eval(m)
        self.progress(t, m)
        return MetricRecord({k: v for k, v in m.items() if isinstance(v, (int, float))}) if m else None


def run_flower_strategy(grid: Grid, setup: Any, text: str, *, on_eval: OnEval | None = None,
                        progress: Progress | None = None, timeout: float = 3600.0) -> SeededStrategy:
    """Run scenario `setup` (`strategy.name: flower`) on `grid`; returns the finished driver."""
    fed = Federation(setup.num_clients, timeout, setup.device)
    inner = build_flower_strategy(class_spec(setup.scenario.strategy.params()))
    driver = SeededStrategy(inner, setup, fed, on_eval=on_eval, progress=progress)
    t = time.perf_counter()
    fed.join(grid, text)
    driver.t0 = time.perf_counter()
    driver.join_s = driver.t0 - t
    with torch.no_grad():
        driver.start(grid=grid, initial_arrays=model_record(driver.server["x"], driver.spec),
                     num_rounds=setup.scenario.rounds, timeout=timeout, evaluate_fn=driver.evaluate)
    return driver
