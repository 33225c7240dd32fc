"""Helpers of tests/test_flower.py: scenarios per strategy, runs, comparisons, a local SuperLink."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from fedsim.config import parse_scenario
from fedsim.engines.loop import RoundLoop
from fedsim.setup import build_setup
from fedsim.testing import final_models
from tests.conftest import small_scenario

ATOL = 1e-12  # float64; observed: 0 for every strategy (server and gossip)
DIGITS = "tests.flower_apps.digits_server:{} tests.flower_apps.digits_client:app"


def strategy_cases() -> list[str]:
    """Every registered strategy, plus FedAvg with a top-k compressed uplink."""
    from strategies import STRATEGIES

    return [*STRATEGIES.names(), "fedavg+top_k"]


def is_gossip(name: str) -> bool:
    """Whether registered strategy `name` (default hyperparameters) mixes with neighbours."""
    from fedsim import testing

    return testing.build(name, {}, testing.heterogeneous_quadratic(4, 2)).comm == "mix"


def case(strategy: str, **over: Any) -> dict:
    """8-client float64 scenario for `strategy` ("base+compressor": a top-k uplink): Bernoulli(0.5)
    participation for server strategies, a ring with everyone for gossip (`strategy.comm`)."""
    base, _, comp = strategy.partition("+")
    strat: dict[str, Any] = {"name": base, "batch_size": 8}
    if comp:
        strat["compressor"] = {"name": comp, "ratio": 0.25}
    where = ({"topology": {"kind": "ring"}, "participation": {"kind": "full"}} if is_gossip(base)
             else {"participation": {"kind": "bernoulli", "p": 0.5}})
    body = small_scenario(strategy=strat, rounds=4, eval={"every": 2}, **where)
    return small_scenario(**{**body, **over})


def reference(body: dict) -> tuple[RoundLoop, list]:
    """The multiplex engine's loop and metrics for scenario `body`."""
    loop = RoundLoop.from_setup(build_setup(parse_scenario(body)))
    return loop, loop.run()


def flower(body: dict, runtime: str = "inprocess", **engine: Any) -> tuple[Any, list]:
    """(adapter or driver, metrics) of scenario `body` on the Flower engine."""
    from fedsim.engines import ENGINES

    sc = parse_scenario({**body, "engine": {**body["engine"], "kind": "flower", "runtime": runtime,
                                            **engine}})
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
    for a, b in zip(ref_hist, hist, strict=True):
        for k, v in a.items():
            if k != "wall_s":
                assert b[k] == (v if v is None else pytest.approx(v, rel=1e-12, abs=ATOL)), k


def same_metrics(ref: list[dict], got: list[dict]) -> bool:
    """Every multiplex metric (but wall_s) appears unchanged in the other run's lines."""
    return len(ref) == len(got) and all(
        {k: v for k, v in m.items() if k != "wall_s"}.items() <= g.items()
        for m, g in zip(ref, got, strict=True))


def digits(kind: str, tmp_path: Any, seed: int = 0, nodes: int = 4) -> dict:
    """Final model of the unmodified digits app (`kind` = fedavg|fedprox|fedadam), in-process."""
    from fedsim.flower.runtime import load_app, run_app

    srv, cli = DIGITS.format(kind).split()
    out = tmp_path / f"{kind}-{seed}-{nodes}.pt"
    run_app(load_app(srv, "ServerApp"), load_app(cli, "ClientApp"), nodes, seed=seed,
            run_config={"num-server-rounds": 2, "final-model": str(out)})
    return torch.load(out)


def run_exported(app_dir: str, nodes: int) -> list[dict]:
    """Run an exported app's own ServerApp/ClientApp modules with its run_config, in-process;
    return the metrics of the run folder it wrote."""
    import glob
    import tomllib

    from fedsim.flower.runtime import load_app, run_app
    from tests.conftest import read_metrics

    with open(os.path.join(app_dir, "pyproject.toml"), "rb") as fh:
        flwr_app = tomllib.load(fh)["tool"]["flwr"]["app"]
    try:
        server = load_app(flwr_app["components"]["serverapp"], "ServerApp", app_dir)
        client = load_app(flwr_app["components"]["clientapp"], "ClientApp", app_dir)
        run_app(server, client, nodes, run_config=flwr_app["config"])
    finally:
        sys.path.remove(os.path.abspath(app_dir))
        for mod in [m for m in sys.modules if m.startswith("fedsim_app")]:
            del sys.modules[mod]
    (run_dir,) = glob.glob(os.path.join(app_dir, "runs", "*"))
    return read_metrics(run_dir)


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

    ports = free_ports(2)
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "FLWR_HOME": home, "OMP_NUM_THREADS": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(ports[0]),
           "FLWR_LOCAL_CONTROL_API_PORT": str(ports[1]),
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    link = subprocess.Popen([os.path.join(bin_dir, "flower-superlink"), "--insecure", "--simulation",
                             "--disable-runtime-dependency-installation",
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


def free_ports(k: int) -> list[int]:
    """k distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks = [socket.socket() for _ in range(k)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_healthy(url: str, procs: list[subprocess.Popen], logs: list[str], deadline: float) -> None:
    import httpx

    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        try:
            if httpx.get(url, timeout=0.5).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    tails = "\n".join(open(f, errors="replace").read()[-1500:] for f in logs)
    raise RuntimeError(f"Flower process not ready at {url}:\n{tails}")


@contextmanager
def deployment(home: str, num_nodes: int, timeout: float = 120.0) -> Iterator[dict]:
    """A real Flower deployment on 127.0.0.1: `flower-superlink --insecure` and `num_nodes`
    `flower-supernode --insecure --node-config "partition-id=i num-partitions=N"` processes on
    free ports, FLWR_HOME=home with a SuperLink connection "deploy". Yields the environment in
    which `flwr run APP deploy` reaches it; every process is stopped on exit."""
    bin_dir = os.path.dirname(sys.executable)
    link, *node_apis = free_ports(1 + num_nodes)  # Flower 1.42: Fleet, Control, Runtime on one
    os.makedirs(home, exist_ok=True)               # HTTP port per SuperLink / SuperNode
    with open(os.path.join(home, "config.toml"), "w") as fh:
        fh.write(f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
                 f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), os.getcwd()) if p)
    env = {**os.environ, "FLWR_HOME": home, "OMP_NUM_THREADS": "1", "PYTHONPATH": path,
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    procs: list[subprocess.Popen] = []
    logs: list[str] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        logs.append(os.path.join(home, f"{name}.log"))
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen([os.path.join(bin_dir, args[0]), *args[1:]], env=env,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        return procs[-1]
    try:
        start("superlink", ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                            "--host", "127.0.0.1", "--port", str(link)])
        deadline = time.time() + timeout
        _wait_healthy(f"http://127.0.0.1:{link}/health", procs, logs, deadline)
        for i, port in enumerate(node_apis):
            start(f"supernode-{i}", ["flower-supernode", "--insecure", "--superlink",
                                     f"127.0.0.1:{link}", "--host", "127.0.0.1", "--port", str(port),
                                     "--node-config", f"partition-id={i} num-partitions={num_nodes}"])
        for port in node_apis:
            _wait_healthy(f"http://127.0.0.1:{port}/health", procs, logs, deadline)
        env["FEDSIM_DEPLOY_LOGS"] = os.pathsep.join(logs)
        yield env
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
