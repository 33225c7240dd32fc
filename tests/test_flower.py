"""Flower: fedsim strategies as real Flower apps, the multiplexed Ray-free runtimes, flower-run,
export-flower, and every Flower internal fedsim touches.

Equivalence cases run 4 rounds of an 8-client float64 scenario (Bernoulli(0.5) participation for
server strategies, a ring for gossip) on the multiplex engine and as a Flower app, for every
registered strategy; Flower runs on `InProcessGrid` here (multiplexed, and one ClientApp call per
message), on Ray / MPI / `flwr run` in the tests marked slow. Flower's own strategy objects
(`strategy.name: flower`) are in tests/test_flower_strategies.py, the SuperLink + SuperNodes
deployment in tests/test_flower_deploy.py. Helpers: tests/flower_apps/support.py.
"""

from __future__ import annotations

import glob
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch

from fedsim.config import parse_scenario
from fedsim.run import WATCHED, signals_restored
from fedsim.setup import build_setup
from tests.conftest import read_metrics, run_cli, small_scenario, write_scenario
from tests.flower_apps.support import (
    DIGITS,
    ask,
    assert_same_run,
    case,
    digits,
    echo_app,
    final,
    flower,
    local_superlink,
    reference,
    run_exported,
    same_metrics,
    strategy_cases,
)

pytestmark = pytest.mark.flower
torch.set_num_threads(1)
CASES = strategy_cases()


# ---- the Flower internals fedsim relies on (fedsim/flower/internals.py) -------------------------
def test_flower_internals_contract():
    """Each internal behaves as internals.py says; a Flower upgrade that changes one fails here."""
    import flwr
    from flwr.app import Message, MessageType, RecordDict
    from flwr.serverapp import Grid
    from flwr.supercore import task_identity
    from flwr.superlink.grid import inmemory_grid
    from flwr.supernode.runtime import run_clientapp

    from fedsim.flower import internals

    assert flwr.__version__.startswith(internals.FLOWER_VERSION + "."), \
        f"flwr {flwr.__version__}: re-check every item of fedsim/flower/internals.py"
    saved = task_identity.TaskIdentity._run_id
    try:  # 1. Message(...) stamps run/node/task from TaskIdentity and fails without it
        task_identity.TaskIdentity._run_id = None
        with pytest.raises(RuntimeError, match="TaskIdentity.run_id is not set"):
            Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
        internals.set_task_identity(7, node_id=1, task_id=3)
        msg = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
        assert (msg.metadata.run_id, msg.metadata.src_node_id, msg.metadata.src_task_id) == (7, 1, 3)
        assert internals.task_identity() == (7, 1, 3)
    finally:
        task_identity.TaskIdentity._run_id = saved
    # 2. Grid.set_run takes the Run type internals builds
    assert typing.get_type_hints(Grid.set_run)["run"] is internals.run_type()
    assert internals.new_run(11).run_id == 11
    # 3. message ids: written as Flower's own InMemoryGrid writes them; copies keep metadata
    assert '__dict__["_message_id"]' in inspect.getsource(inmemory_grid.InMemoryGrid.push_messages)
    assert internals.set_message_id(msg, "m-1") is msg and msg.metadata.message_id == "m-1"
    twin = internals.copy_message(msg, RecordDict())
    assert twin.metadata == msg.metadata and twin.metadata is not msg.metadata
    assert Message(RecordDict(), reply_to=twin).metadata.reply_to_message_id == "m-1"
    # 4. the error code Flower's SuperNode puts in the reply of a ClientApp that raised
    assert "ErrorCode.CLIENT_APP_RAISED_EXCEPTION" in inspect.getsource(run_clientapp)
    assert internals.client_app_error_code() == 2 and internals.server_node_id() == 1


def test_records_encode_exactly_what_flower_writes():
    """encode == Flower's Array(ndarray) bytes; decode == Array.numpy(); float64 round trip."""
    from flwr.app import Array

    from fedsim.flower.records import (
        decode,
        encode,
        model_record,
        pack_mask,
        record_model,
        record_to_tree,
        stack_records,
        tree_to_record,
        unpack_mask,
    )

    g = np.random.default_rng(0)
    for arr in (g.normal(size=(1, 7)), g.normal(size=(3, 2, 2)).astype(np.float32),
                np.arange(5, dtype=np.int64), np.zeros((0, 4)), np.array(2.5)):
        ours, theirs = encode(arr), Array(arr)
        assert (ours.dtype, ours.shape, ours.stype, ours.data) == \
            (theirs.dtype, theirs.shape, theirs.stype, theirs.data)
        back = decode(theirs)
        assert back.dtype == arr.dtype and np.array_equal(back, arr) and back.flags.writeable
    fortran = np.asfortranarray(g.normal(size=(3, 4)))
    assert np.array_equal(decode(Array(fortran)), fortran)  # other layouts: Flower's own reader
    tree = {"x": torch.tensor([[0.1, -2.5e-300, 3.0]], dtype=torch.float64), "c": torch.ones(1, 3)}
    back = record_to_tree(tree_to_record(tree))
    assert all(torch.equal(back[k], tree[k]) and back[k].dtype == tree[k].dtype for k in tree)
    two = stack_records([tree_to_record(tree), tree_to_record({k: 2 * v for k, v in tree.items()})])
    assert torch.equal(two["x"], torch.cat([tree["x"], 2 * tree["x"]]))
    spec = build_setup(parse_scenario(small_scenario())).model.spec
    x = torch.randn(spec.size, dtype=torch.float64)
    rec = model_record(x, spec)
    assert list(rec.keys()) == list(spec.names) and tuple(rec[spec.names[0]].shape) == spec.shapes[0]
    assert torch.equal(record_model(rec, spec, "cpu", torch.float64), x)
    mask = np.array([1, 0, 0, 1, 1, 0, 1, 0, 1], bool)
    assert np.array_equal(unpack_mask(pack_mask(mask), 9), mask) and len(pack_mask(mask)) == 2


# ---- the Ray-free Grid ----------------------------------------------------------------------------
def test_inprocess_grid_nodes_contexts_rng_errors_and_bytes():
    """Stable ids, Flower's node_config, persistent Context.state, keyed node RNG that leaves the
    caller's RNG alone, ClientApp exceptions as error replies, ids, bytes counted per message;
    a plain ClientApp (no handle_batch) gets one call per message."""
    from fedsim.flower.grid import InProcessGrid

    grid = InProcessGrid(echo_app(), 3, seed=5)
    ids = grid.get_node_ids()
    assert ids == InProcessGrid(echo_app(), 3, seed=6).get_node_ids() and len(set(ids)) == 3
    assert not grid.host.batched
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first, second = ask(grid), ask(grid)
    assert torch.equal(torch.get_rng_state(), before)
    cfg = [r.content["config"] for r in second]
    assert [c["partition-id"] for c in cfg] == [0, 1, 2] and {c["num-partitions"] for c in cfg} == {3}
    assert [c["calls"] for c in cfg] == [2, 2, 2] and [r.metadata.src_node_id for r in first] == ids
    assert [r.metadata.reply_to_message_id for r in second] == [f"{i:012d}" for i in (4, 5, 6)]
    assert [r.metadata.message_id for r in second] == [f"r{i:012d}" for i in (4, 5, 6)]
    draws = [r.content["config"]["draw"] for r in first]
    assert [r.content["config"]["draw"] for r in ask(InProcessGrid(echo_app(), 3, seed=5))] == draws
    assert [r.content["config"]["draw"] for r in ask(InProcessGrid(echo_app(), 3, seed=4))] != draws
    errors = ask(grid, fail=True)
    assert all(r.has_error() and "boom on purpose" in r.error.reason and r.error.code == 2
               for r in errors)
    assert grid.bytes_down > 0 and grid.bytes_up > 0 and grid.messages == 9


def test_a_failing_multiplexed_push_answers_every_message_with_an_error():
    """fedsim's ClientApp batch fails as a whole (here: work before joining, an unknown message
    type): every message of the push gets Flower's ClientApp error reply, nothing is lost."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedsim.flower.client import make_client_app
    from fedsim.flower.grid import InProcessGrid

    grid = InProcessGrid(make_client_app(), 3)
    assert grid.host.batched
    for mtype, why in (("train", "before joining"), ("train.nosuch", "no handler")):
        msgs = [Message(RecordDict({"config": ConfigRecord({"round": 0})}), dst_node_id=i,
                        message_type=mtype) for i in grid.get_node_ids()]
        replies = grid.send_and_receive(msgs)
        assert len(replies) == 3 and all(r.has_error() and r.error.code == 2 and why in r.error.reason
                                         for r in replies)
        assert [r.metadata.src_node_id for r in replies] == grid.get_node_ids()


# ---- fedsim strategies as Flower apps -------------------------------------------------------------
@pytest.mark.parametrize("multiplex", [True, False], ids=["multiplexed", "per-message"])
@pytest.mark.parametrize("name", CASES)
def test_flower_inprocess_equals_multiplex(name, multiplex):
    """Every registered strategy: the same final parameters (bitwise for server strategies) and
    metrics on multiplex and on Flower, multiplexed or one ClientApp call per message."""
    body = case(name)
    ref, ref_hist = reference(body)
    adapter, hist = flower(body, multiplex=multiplex)
    assert_same_run(ref, ref_hist, final(adapter), hist)
    if adapter.strategy.comm == "reduce":
        assert torch.equal(final(adapter), ref.state.server[ref.strategy.model_key])
    assert hist[-1]["flower_bytes_up"] > 0


def _block_sizes(body: dict, **engine) -> tuple[list[int], torch.Tensor, list]:
    """Sizes of the blocks `strategy.local` ran on, the final model and the metrics."""
    from fedsim.engines import ENGINES

    sc = parse_scenario({**body, "engine": {**body["engine"], "kind": "flower", **engine}})
    setup = build_setup(sc)
    sizes, local = [], setup.strategy.local

    def spy(server, clients, oracle, ctx):
        sizes.append(ctx.m)
        return local(server, clients, oracle, ctx)
    setup.strategy = setup.strategy._replace(local=spy)
    eng = ENGINES.build("flower", sc.engine.params())
    hist = eng.run(setup, on_eval=lambda m: None)
    return sizes, final(eng.adapter), hist


def test_multiplexed_grid_trains_a_round_as_one_block_in_chunks():
    """The participants of a round are one stacked call (chunk_size splits it), one call each
    per message without multiplexing; the results are the same bit for bit."""
    body = case("scaffold", name="spy-block")
    setup = build_setup(parse_scenario(body))
    per_round = [int(setup.participation.mask(t).sum()) for t in range(4)]
    stacked, x1, h1 = _block_sizes(body)
    assert stacked == [m for m in per_round if m] and max(stacked) > 1
    chunked, x2, h2 = _block_sizes({**body, "name": "spy-chunk"}, chunk_size=3)
    assert chunked == [c for m in per_round for c in [3] * (m // 3) + [m % 3] * (m % 3 > 0)]
    single, x3, _ = _block_sizes({**body, "name": "spy-single"}, multiplex=False)
    assert single == [1] * sum(per_round)
    assert torch.equal(x1, x2) and torch.equal(x1, x3)
    assert [m["test_loss"] for m in h1] == [m["test_loss"] for m in h2]


def test_empty_rounds_and_staleness_match_the_engine():
    """Rounds nobody joins (server_update gets {}) and CO2's one-round-late update."""
    for name in ("fedavg", "co2"):
        body = case(name, participation={"kind": "bernoulli", "p": 0.1}, rounds=6)
        setup = build_setup(parse_scenario(body))
        assert any(not setup.participation.mask(t).any() for t in range(6)), "need an empty round"
        ref, ref_hist = reference(body)
        adapter, hist = flower(body)
        assert_same_run(ref, ref_hist, final(adapter), hist)


@pytest.mark.parametrize("multiplex", [True, False], ids=["multiplexed", "per-message"])
def test_client_state_lives_in_the_node_context(multiplex):
    """SCAFFOLD's c_i sits in each node's Context.state (equal to the engine's store row), written
    per node by the multiplexed path as by the per-message one."""
    from fedsim.flower import client, server
    from fedsim.flower import grid as g
    from fedsim.flower.records import record_to_tree

    body = case("scaffold", name=f"state-{multiplex}")
    setup = build_setup(parse_scenario(body))
    ref, _ = reference(body)
    grid = g.InProcessGrid(client.make_client_app(), setup.num_clients, multiplex=multiplex)
    done: list = []
    g.run_server_app(server.make_server_app(setup, client.scenario_text(setup.scenario), done=done),
                     grid)
    seen = [p for p in range(8) if any(setup.participation.mask(t)[p] for t in range(4))]
    for p, ctx in enumerate(grid.host.contexts.values()):
        state = ctx.state.get(client.STATE_KEY)
        assert (state is not None) == (p in seen)
        if state is not None:
            row = ref.state.store.gather(torch.tensor([p]))
            assert torch.equal(record_to_tree(state)["c"], row["c"])
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
        outs.append(out.strip())
    assert same_metrics(*map(read_metrics, outs))
    summary = json.loads(open(os.path.join(outs[1], "summary.json")).read())
    assert summary["flower_join_s"] >= 0 and summary["wall_s"] == read_metrics(outs[1])[-1]["wall_s"]


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
def _export(tmp_path, capsys, body: dict | None = None) -> tuple[str, dict, list]:
    """Export a 2-round scenario; return (app dir, its pyproject, the multiplex metrics)."""
    import tomllib

    path = write_scenario(tmp_path, body or small_scenario(rounds=2))
    code, _, err = run_cli(["export-flower", path, str(tmp_path / "app")], capsys)
    assert code == 0, err
    code, run_dir, err = run_cli(["run", path, "--quiet", "--out", str(tmp_path / "ref")], capsys)
    assert code == 0, err
    with open(tmp_path / "app" / "pyproject.toml", "rb") as fh:
        return str(tmp_path / "app"), tomllib.load(fh), read_metrics(run_dir.strip())


def test_exported_flower_app_is_relocatable(tmp_path, capsys):
    """No absolute path in the export; moved elsewhere it runs and writes next to itself."""
    app_dir, project, ref = _export(tmp_path, capsys)
    assert set(project["tool"]["flwr"]["app"]["components"]) == {"serverapp", "clientapp"}
    for rel in ("pyproject.toml", "README.md", "scenario.yaml", "fedsim_app/server_app.py"):
        assert str(tmp_path) not in open(os.path.join(app_dir, rel)).read(), rel
    moved = str(tmp_path / "elsewhere" / "my_app")
    shutil.move(app_dir, moved)
    assert not os.path.exists(app_dir)
    assert same_metrics(ref, run_exported(moved, 8))


# ---- Ray, MPI and `flwr run` (slow: each starts processes; Ray alone takes seconds) ------------
@pytest.mark.slow
def test_ray_flower_equals_multiplex_for_every_strategy():
    """One Flower simulation (Ray) runs every registered strategy's scenario in turn."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedsim.flower import client
    from fedsim.flower.adapter import run_adapter

    cases = []
    for name in CASES:
        setup = build_setup(parse_scenario(case(name)))
        cases.append((*reference(case(name)), setup, client.scenario_text(setup.scenario)))
    done: list = []
    app = ServerApp()

    @app.main()
    def main(grid, context):
        for _, _, setup, text in cases:
            done.append(run_adapter(grid, setup, text))

    with signals_restored():  # Ray's init replaces SIGTERM's handler (conftest's guard)
        run_simulation(app, client.make_client_app(threads=1), 8,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"logging_level": "ERROR"}})
    assert len(done) == len(cases) == len(CASES)
    for (ref, hist, _, _), adapter in zip(cases, done, strict=True):
        assert_same_run(ref, hist, final(adapter), adapter.history)


@pytest.mark.slow
def test_flower_run_cli_on_ray_with_run_config(tmp_path, capsys):
    """... and the caller's SIGINT / SIGTERM / SIGHUP handlers are still its own afterwards
    (Ray's init installs a SIGTERM handler and never puts the old one back)."""
    def mine(signum, frame):  # the caller's handler: not a default one
        pass

    out = tmp_path / "ray.pt"
    srv, cli = DIGITS.format("fedavg").split()
    with signals_restored():
        for sig in WATCHED:
            signal.signal(sig, mine)
        code, _, err = run_cli(["flower-run", srv, cli, "--nodes", "4", "--runtime", "ray",
                                "--run-config", f"num-server-rounds=2 final-model='{out}'"], capsys)
        assert [signal.getsignal(sig) for sig in WATCHED] == [mine] * 3
    assert code == 0, err
    assert all(torch.isfinite(v).all() for v in torch.load(out).values())


@pytest.mark.slow
@pytest.mark.mpi
def test_mpi_runtime_equals_inprocess_and_multiplex(tmp_path):
    """3 ranks: 6 digits nodes (bit-identical to in-process) and every strategy's scenario with
    each rank multiplexing its nodes (= multiplex)."""
    from tests.test_mpi import MPIEXEC, mpi4py, mpiexec

    if MPIEXEC is None or mpi4py is None:
        pytest.skip("needs mpiexec and mpi4py")
    paths = [write_scenario(tmp_path, {**case(n), "name": n}, f"{n}.yaml") for n in CASES]
    res = mpiexec(3, [sys.executable, "tests/flower_apps/mpi_check.py", str(tmp_path), *paths],
                  timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    mpi, local = torch.load(tmp_path / "digits.pt"), digits("fedavg", tmp_path, nodes=6)
    assert all(torch.equal(mpi[k], local[k]) for k in mpi)
    for n in CASES:
        ref, hist = reference(case(n))
        got = json.loads((tmp_path / f"{n}.json").read_text())
        assert_same_run(ref, hist, torch.tensor(got["final"], dtype=torch.float64), got["history"])


@pytest.mark.slow
def test_exported_app_runs_under_flwr_run(tmp_path, capsys):
    """`flwr run DIR` (Flower's local SuperLink, simulation mode, Ray backend) on the export."""
    app_dir, _, ref = _export(tmp_path, capsys)
    out = tmp_path / "flwr-runs"
    with local_superlink(str(tmp_path / "flwr")) as env:
        res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "flwr"), "run", app_dir,
                              "--federation-config", "num-supernodes=8", "--stream",
                              "--run-config", f"output-dir='{out}'"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir,) = glob.glob(os.path.join(out, "*"))
    assert same_metrics(ref, read_metrics(run_dir))
