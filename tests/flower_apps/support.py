"""Helpers of tests/test_flower.py: scenarios per strategy, runs, comparisons, a local SuperLink."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import torch

from fedsim.config import parse_scenario
from fedsim.engines.loop import RoundLoop
from fedsim.setup import build_setup
from fedsim.testing import final_models
from tests.conftest import small_scenario

ATOL = 1e-12  # float64; observed: 0 for server strategies, <= 4e-16 for gossip (mixing order)
DIGITS = "tests.flower_apps.digits_server:{} tests.flower_apps.digits_client:app"


def registered(name: str) -> bool:
    from strategies import STRATEGIES

    return name in STRATEGIES.names()


def case(name: str, **over: Any) -> dict:
    """8-client float64 scenario for `name` ("base+compressor" adds a top-k uplink): Bernoulli(0.5)
    participation, or a ring with everyone for gossip strategies. Skips unregistered names."""
    base, _, comp = name.partition("+")
    if not registered(base):
        pytest.skip(f"strategy {base!r} not registered yet")
    strat = {"name": base, "batch_size": 8}
    if comp:
        strat["compressor"] = {"name": comp, "ratio": 0.25}
    body = small_scenario(strategy=strat, rounds=4, eval={"every": 2},
                          participation={"kind": "bernoulli", "p": 0.5})
    try:
        build_setup(parse_scenario(body))
    except Exception:  # gossip strategies need everyone every round, and a graph
        body = small_scenario(strategy=strat, rounds=4, eval={"every": 2}, topology={"kind": "ring"},
                              participation={"kind": "full"})
    return small_scenario(**{**body, **over})


def reference(body: dict) -> tuple[RoundLoop, list]:
    """The multiplex engine's loop and metrics for scenario `body`."""
    loop = RoundLoop.from_setup(build_setup(parse_scenario(body)))
    return loop, loop.run()


def flower(body: dict, runtime: str = "inprocess") -> tuple[Any, list]:
    """(adapter, metrics) of scenario `body` on the Flower engine."""
    from fedsim.engines import ENGINES

    sc = parse_scenario({**body, "engine": {**body["engine"], "kind": "flower", "runtime": runtime}})
    engine = ENGINES.build("flower", sc.engine.params())
    history = engine.run(build_setup(sc), on_eval=lambda m: None)
    return engine.adapter, history


def final(adapter: Any) -> torch.Tensor:
    """[P] global model (server strategies) or [N, P] node models (gossip) after a Flower run."""
    if adapter.strategy.comm == "reduce":
        return adapter.server[adapter.strategy.model_key]
    return adapter.node_models


def assert_same_run(ref: RoundLoop, ref_hist: list, x: torch.Tensor, hist: list) -> None:
    """Final parameters within ATOL and every multiplex metric (but wall_s) equal."""
    torch.testing.assert_close(x, final_models(ref), rtol=0, atol=ATOL)
    assert len(hist) == len(ref_hist)
    for a, b in zip(ref_hist, hist):
        for k, v in a.items():
            if k != "wall_s":
                assert b[k] == (v if v is None else pytest.approx(v, rel=1e-12, abs=ATOL)), k


def same_metrics(ref: list[dict], got: list[dict]) -> bool:
    """Every multiplex metric (but wall_s) appears unchanged in the other run's lines."""
    return len(ref) == len(got) and all(
        {k: v for k, v in m.items() if k != "wall_s"}.items() <= g.items() for m, g in zip(ref, got))


def digits(kind: str, tmp_path: Any, seed: int = 0, nodes: int = 4) -> dict:
    """Final model of the unmodified digits app (`kind` = fedavg|fedprox|fedadam), in-process."""
    from fedsim.flower.runtime import load_app, run_app

    srv, cli = DIGITS.format(kind).split()
    out = tmp_path / f"{kind}-{seed}-{nodes}.pt"
    run_app(load_app(srv, "ServerApp"), load_app(cli, "ClientApp"), nodes, seed=seed,
            run_config={"num-server-rounds": 2, "final-model": str(out)})
    return torch.load(out)


def echo_app() -> Any:
    """A ClientApp answering queries with its node_config, a call counter kept in Context.state,
    and a draw from torch's global RNG; it raises when asked to."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Any) -> Message:
        if msg.content["config"]["fail"]:
            raise ValueError("boom on purpose")
        calls = int(context.state["n"]["calls"]) + 1 if "n" in context.state else 1
        context.state["n"] = MetricRecord({"calls": calls})
        cfg = ConfigRecord({"partition-id": context.node_config["partition-id"],
                            "num-partitions": context.node_config["num-partitions"],
                            "calls": calls, "draw": float(torch.rand(()))})
        return Message(RecordDict({"config": cfg}), reply_to=msg)
    return app


def ask(grid: Any, fail: bool = False) -> list:
    """One query to every node of `grid`."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    return grid.send_and_receive([Message(RecordDict({"config": ConfigRecord({"fail": fail})}),
                                          dst_node_id=i, message_type=MessageType.QUERY)
                                  for i in grid.get_node_ids()])


@contextmanager
def local_superlink(home: str) -> Iterator[dict]:
    """The SuperLink `flwr run` would start detached for a ':local:' connection, started here
    (same command line, free ports, FLWR_HOME=home) so the caller owns and stops it.
    Yields the environment in which `flwr run` finds it."""
    import httpx

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "FLWR_HOME": home, "OMP_NUM_THREADS": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(ports[0]),
           "FLWR_LOCAL_CONTROL_API_PORT": str(ports[1]),
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    link = subprocess.Popen([os.path.join(bin_dir, "flower-superlink"), "--insecure", "--simulation",
                             "--isolation", "subprocess", "--control-api-address",
                             f"127.0.0.1:{ports[1]}", "--host", "127.0.0.1", "--port", str(ports[0])],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{ports[0]}/health", timeout=0.5).is_success:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield env
    finally:
        os.killpg(link.pid, signal.SIGTERM)
        link.wait(timeout=30)
