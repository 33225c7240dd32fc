"""Flower: fedsim strategies as real Flower apps, the Ray-free runtimes, flower-run, export-flower.

Equivalence cases run 4 rounds of an 8-client float64 scenario (Bernoulli(0.5) participation for
server strategies, a ring for gossip) on the multiplex engine and as a Flower app; Flower runs on
`InProcessGrid` here, on Ray / MPI / `flwr run` in the tests marked slow (each Ray start costs
seconds, so one Ray session runs every strategy). Helpers: tests/flower_apps/support.py.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedsim.config import parse_scenario
from fedsim.setup import build_setup
from tests.conftest import read_metrics, run_cli, small_scenario, write_scenario
from tests.flower_apps.support import (ATOL, DIGITS, ask, assert_same_run, case, digits, echo_app,
                                       final, flower, local_superlink, reference, registered,
                                       same_metrics)

pytestmark = pytest.mark.flower
torch.set_num_threads(1)

# The brief's strategies, then extra registered ones; names not registered yet are skipped.
STRATEGIES = ("fedavg", "fedavgm", "scaffold", "fedau", "ef21", "gossip", "co2",
              "fedavg+top_k", "gossip-var", "choco", "fedavg-m", "mifa")


# ---- the Flower internal fedsim relies on ---------------------------------------------------------
def test_task_identity_contract():
    """Flower 1.41 stamps instruction Messages from TaskIdentity; fedsim sets it in one place."""
    import flwr
    from flwr.app import Message, MessageType, RecordDict
    from flwr.supercore import task_identity

    from fedsim.flower.identity import set_task_identity, task_identity as current

    assert flwr.__version__.startswith("1.41"), "re-check fedsim/flower/identity.py for this flwr"
    saved = task_identity.TaskIdentity._run_id
    try:
        task_identity.TaskIdentity._run_id = None
        with pytest.raises(RuntimeError, match="TaskIdentity.run_id is not set"):
            Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
        set_task_identity(7, node_id=1, task_id=3)
        meta = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN).metadata
        assert (meta.run_id, meta.src_node_id, meta.src_task_id, meta.dst_node_id) == (7, 1, 3, 5)
        assert current() == (7, 1, 3)
    finally:
        task_identity.TaskIdentity._run_id = saved


def test_records_round_trip_float64_exactly():
    from fedsim.flower.records import pack_mask, record_to_tree, tree_to_record, unpack_mask

    tree = {"x": torch.tensor([0.1, -2.5e-300, 3.0], dtype=torch.float64), "c": torch.ones(2, 3)}
    back = record_to_tree(tree_to_record(tree))
    assert all(torch.equal(back[k], tree[k]) and back[k].dtype == tree[k].dtype for k in tree)
    mask = np.array([1, 0, 0, 1, 1, 0, 1, 0, 1], bool)
    assert np.array_equal(unpack_mask(pack_mask(mask), 9), mask) and len(pack_mask(mask)) == 2


# ---- the Ray-free Grid ----------------------------------------------------------------------------
def test_inprocess_grid_nodes_contexts_rng_errors_and_bytes():
    """Stable ids, Flower's node_config, persistent Context.state, keyed node RNG that leaves the
    caller's RNG alone, ClientApp exceptions as error replies, bytes counted per message."""
    from fedsim.flower.grid import InProcessGrid

    grid = InProcessGrid(echo_app(), 3, seed=5)
    ids = grid.get_node_ids()
    assert ids == InProcessGrid(echo_app(), 3, seed=6).get_node_ids() and len(set(ids)) == 3
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first, second = ask(grid), ask(grid)
    assert torch.equal(torch.get_rng_state(), before)
    cfg = [r.content["config"] for r in second]
    assert [c["partition-id"] for c in cfg] == [0, 1, 2] and {c["num-partitions"] for c in cfg} == {3}
    assert [c["calls"] for c in cfg] == [2, 2, 2] and [r.metadata.src_node_id for r in first] == ids
    draws = [r.content["config"]["draw"] for r in first]
    assert [r.content["config"]["draw"] for r in ask(InProcessGrid(echo_app(), 3, seed=5))] == draws
    assert [r.content["config"]["draw"] for r in ask(InProcessGrid(echo_app(), 3, seed=4))] != draws
    assert all(r.has_error() and "boom on purpose" in r.error.reason for r in ask(grid, fail=True))
    assert grid.bytes_down > 0 and grid.bytes_up > 0 and grid.messages == 9


# ---- fedsim strategies as Flower apps -------------------------------------------------------------
@pytest.mark.parametrize("name", STRATEGIES)
def test_flower_inprocess_equals_multiplex(name):
    """Same final parameters (atol 1e-12) and the same metrics on multiplex and Flower."""
    body = case(name)
    ref, ref_hist = reference(body)
    adapter, hist = flower(body)
    assert_same_run(ref, ref_hist, final(adapter), hist)
    assert hist[-1]["flower_bytes_up"] > 0


def test_empty_rounds_and_staleness_match_the_engine():
    """Rounds nobody joins (server_update gets {}) and CO2's one-round-late update."""
    for name in ("fedavg", "co2"):
        body = case(name, participation={"kind": "bernoulli", "p": 0.1}, rounds=6)
        setup = build_setup(parse_scenario(body))
        assert any(not setup.participation.mask(t).any() for t in range(6)), "need an empty round"
        ref, ref_hist = reference(body)
        adapter, hist = flower(body)
        assert_same_run(ref, ref_hist, final(adapter), hist)


def test_client_state_lives_in_the_node_context():
    """SCAFFOLD's c_i sits in each node's Context.state (equal to the engine's store row)."""
    from fedsim.flower import client, grid as g, server
    from fedsim.flower.records import record_to_tree

    body = case("scaffold")
    setup = build_setup(parse_scenario(body))
    ref, _ = reference(body)
    grid = g.InProcessGrid(client.make_client_app(), setup.num_clients)
    done: list = []
    g.run_server_app(server.make_server_app(setup, client.scenario_text(setup.scenario), done=done),
                     grid)
    seen = [p for p in range(8) if any(setup.participation.mask(t)[p] for t in range(4))]
    for p, ctx in enumerate(grid.host.contexts.values()):
        state = ctx.state.get(client.STATE_KEY)
        assert (state is not None) == (p in seen)
        if state is not None:
            row = ref.state.store.gather(torch.tensor([p]))
            torch.testing.assert_close(record_to_tree(state)["c"], row["c"], rtol=0, atol=ATOL)
    assert set(done[0].server) == set(ref.state.server), "the server keeps only server state"


def test_bytes_one_round_by_hand():
    """One FedAvg round, 4 of 8 clients: bytes_up = bytes_down = 4 * P * 8 (float64, dense),
    and the Flower counters see every message's records (arrays + config + metrics)."""
    adapter, hist = flower(small_scenario(rounds=1))
    p = adapter.setup.model.spec.size
    assert (hist[-1]["bytes_up"], hist[-1]["bytes_down"]) == (4 * p * 8, 4 * p * 8)
    assert hist[-1]["flower_bytes_up"] > 4 * p * 8 and hist[-1]["flower_bytes_down"] > 4 * p * 8


def test_fedsim_run_engine_flower_writes_the_multiplex_metrics(tmp_path, capsys):
    path = write_scenario(tmp_path, small_scenario(rounds=2))
    outs = []
    for extra in ([], ["--engine", "flower"]):
        code, out, err = run_cli(["run", path, "--quiet", "--out", str(tmp_path), *extra], capsys)
        assert code == 0, err
        outs.append(read_metrics(out.strip()))
    assert same_metrics(*outs)


# ---- unmodified Flower apps on the Ray-free runtime ---------------------------------------------
def test_flower_fedavg_app_reruns_bit_identical_on_inprocess(tmp_path):
    a, b = digits("fedavg", tmp_path), digits("fedavg", tmp_path)
    c = digits("fedavg", tmp_path, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("kind", ["fedprox", "fedadam"])
def test_flower_run_cli_runs_flower_strategies(kind, tmp_path, capsys):
    out = tmp_path / f"{kind}.pt"
    srv, cli = DIGITS.format(kind).split()
    code, _, err = run_cli(["flower-run", srv, cli, "--nodes", "4", "--run-config",
                            f"num-server-rounds=2 final-model='{out}'"], capsys)
    assert code == 0, err
    assert "runtime=inprocess nodes=4" in err and "messages=4" in err
    model, fedavg = torch.load(out), digits("fedavg", tmp_path)
    assert all(torch.isfinite(v).all() for v in model.values())
    assert not all(torch.equal(model[k], fedavg[k]) for k in model)


# ---- export-flower --------------------------------------------------------------------------------
def _export(tmp_path, capsys) -> tuple[str, dict, list]:
    """Export a 2-round scenario; return (app dir, its pyproject, the multiplex metrics)."""
    import tomllib

    path = write_scenario(tmp_path, small_scenario(rounds=2))
    code, _, err = run_cli(["export-flower", path, str(tmp_path / "app")], capsys)
    assert code == 0, err
    code, run_dir, err = run_cli(["run", path, "--quiet", "--out", str(tmp_path / "ref")], capsys)
    with open(tmp_path / "app" / "pyproject.toml", "rb") as fh:
        return str(tmp_path / "app"), tomllib.load(fh), read_metrics(run_dir.strip())


def test_exported_flower_app_runs_and_matches_multiplex(tmp_path, capsys):
    """The exported project's own ServerApp/ClientApp modules, run with its run_config."""
    from fedsim.flower.runtime import load_app, run_app

    app_dir, project, ref = _export(tmp_path, capsys)
    flwr_app = project["tool"]["flwr"]["app"]
    assert set(flwr_app["components"]) == {"serverapp", "clientapp"}
    try:
        server = load_app(flwr_app["components"]["serverapp"], "ServerApp", app_dir)
        client = load_app(flwr_app["components"]["clientapp"], "ClientApp", app_dir)
        run_app(server, client, 8, run_config=flwr_app["config"])
    finally:
        sys.path.remove(app_dir)
        for mod in [m for m in sys.modules if m.startswith("fedsim_app")]:
            del sys.modules[mod]
    (run_dir,) = glob.glob(os.path.join(app_dir, "runs", "*"))
    assert same_metrics(ref, read_metrics(run_dir))


# ---- Ray, MPI and `flwr run` (slow: each starts processes; Ray alone takes seconds) ------------
@pytest.mark.slow
def test_ray_flower_equals_multiplex_for_every_strategy():
    """One Flower simulation (Ray) runs every registered strategy's scenario in turn."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedsim.flower import client
    from fedsim.flower.adapter import run_adapter

    cases = []
    for name in STRATEGIES:
        if registered(name.partition("+")[0]):
            setup = build_setup(parse_scenario(case(name)))
            cases.append((*reference(case(name)), setup, client.scenario_text(setup.scenario)))
    done: list = []
    app = ServerApp()

    @app.main()
    def main(grid, context):
        for _, _, setup, text in cases:
            done.append(run_adapter(grid, setup, text))

    run_simulation(app, client.make_client_app(threads=1), 8,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR"}})
    assert len(done) == len(cases) >= 1
    for (ref, hist, _, _), adapter in zip(cases, done):
        assert_same_run(ref, hist, final(adapter), adapter.history)


@pytest.mark.slow
def test_flower_run_cli_on_ray_with_run_config(tmp_path, capsys):
    out = tmp_path / "ray.pt"
    srv, cli = DIGITS.format("fedavg").split()
    code, _, err = run_cli(["flower-run", srv, cli, "--nodes", "4", "--runtime", "ray",
                            "--run-config", f"num-server-rounds=2 final-model='{out}'"], capsys)
    assert code == 0, err
    assert all(torch.isfinite(v).all() for v in torch.load(out).values())


@pytest.mark.slow
@pytest.mark.mpi
def test_mpi_runtime_equals_inprocess_and_multiplex(tmp_path):
    """3 ranks: 6 digits nodes (bit-identical to in-process) and fedsim scenarios (= multiplex)."""
    from tests.test_mpi import MPIEXEC, mpi4py, mpiexec

    if MPIEXEC is None or mpi4py is None:
        pytest.skip("needs mpiexec and mpi4py")
    names = [n for n in ("fedavg", "scaffold", "gossip") if registered(n)]
    paths = [write_scenario(tmp_path, {**case(n), "name": n}, f"{n}.yaml") for n in names]
    res = mpiexec(3, [sys.executable, "tests/flower_apps/mpi_check.py", str(tmp_path), *paths],
                  timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    mpi, local = torch.load(tmp_path / "digits.pt"), digits("fedavg", tmp_path, nodes=6)
    assert all(torch.equal(mpi[k], local[k]) for k in mpi)
    for n in names:
        ref, hist = reference(case(n))
        got = json.loads((tmp_path / f"{n}.json").read_text())
        assert_same_run(ref, hist, torch.tensor(got["final"], dtype=torch.float64), got["history"])


@pytest.mark.slow
def test_exported_app_runs_under_flwr_run(tmp_path, capsys):
    """`flwr run DIR` (Flower's local SuperLink, simulation mode, Ray backend) on the export."""
    app_dir, _, ref = _export(tmp_path, capsys)
    with local_superlink(str(tmp_path / "flwr")) as env:
        res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "flwr"), "run", app_dir,
                              "--federation-config", "num-supernodes=8", "--stream"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir,) = glob.glob(os.path.join(app_dir, "runs", "*"))
    assert same_metrics(ref, read_metrics(run_dir))
