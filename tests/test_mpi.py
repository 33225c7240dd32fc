"""MPI engine under real `mpiexec`: equals the multiplex engine on 1-4 ranks, rejects bad input on
every rank, brings the job down on a fault, keeps each rank's data to its slice.

Each launch costs an interpreter + torch start-up per rank, so the checks are batched: one
launch runs every loop-level case (tests/mpi_scripts/loop_check.py), one launch per rank count
runs every CLI scenario (tests/mpi_scripts/run_many.py).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, read_metrics, small_scenario, strategy_scenario, write_scenario

BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
try:
    import mpi4py  # noqa: F401
except ImportError:  # pragma: no cover - environment without the [mpi] extra
    mpi4py = None

pytestmark = pytest.mark.mpi
needs_mpi = pytest.mark.skipif(MPIEXEC is None or mpi4py is None, reason="needs mpiexec and mpi4py")

METRICS = ("train_loss", "test_loss", "test_accuracy", "bytes_up", "bytes_down", "sim_time_s",
           "consensus_distance", "node_accuracy_mean", "client_acc_mean", "client_acc_weighted",
           "client_acc_worst10", "client_acc_std", "client_acc_p10", "client_acc_median", "client_acc_p90",
           "client_loss", "clients_evaluated")


def mpiexec(n: int, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """`mpiexec -n n args` from the repo root (Open MPI flags when running as root)."""
    flags = []
    version = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        flags = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run([MPIEXEC, *flags, "-n", str(n), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _registered() -> list[str]:
    from strategies import STRATEGIES

    return STRATEGIES.names()


def _body(strategy: str) -> dict:
    return strategy_scenario(strategy)


def _reference(body: dict) -> tuple[list[dict], list[float], np.ndarray]:
    """Multiplex run in-process: metric history, final-model fingerprint, client data sizes."""
    from fedsim.config import parse_scenario
    from fedsim.engines.loop import RoundLoop
    from fedsim.engines.mpi import model_fingerprint
    from fedsim.setup import build_setup

    setup = build_setup(parse_scenario(body))
    loop = RoundLoop.from_setup(setup)
    hist = loop.run()
    st = loop.strategy
    if st.comm == "reduce":
        fp = model_fingerprint(loop.state.server[st.model_key][None], torch.zeros(1, dtype=torch.int64))
    else:
        ids = torch.arange(loop.num_clients)
        fp = model_fingerprint(loop.state.store.gather(ids)[st.model_key], ids)
    return hist, [float(v) for v in fp], setup.sizes


@pytest.fixture(scope="module")
def cli_cases(tmp_path_factory) -> dict:
    """Scenario files and multiplex references for every registered strategy."""
    tmp = tmp_path_factory.mktemp("mpi_cli")
    cases = {}
    for name in _registered():
        body = _body(name)
        cases[name] = (write_scenario(tmp, body, f"{name}.yaml"), body, _reference(body))
    return cases


@pytest.fixture(scope="module")
def launches(cli_cases, tmp_path_factory):
    """`launch(K)`: one mpiexec of every CLI scenario on K ranks (K = 2, 3 add the loop checks)."""
    done: dict[int, tuple[subprocess.CompletedProcess, Path]] = {}

    def launch(ranks: int) -> tuple[subprocess.CompletedProcess, Path]:
        if ranks not in done:
            out = tmp_path_factory.mktemp(f"mpi_runs_{ranks}")
            extra = ["--loop-check"] if ranks in (2, 3) else []
            paths = [p for p, _, _ in cli_cases.values()]
            done[ranks] = (mpiexec(ranks, [sys.executable, "tests/mpi_scripts/run_many.py", str(out),
                                           *extra, *paths], timeout=900), out)
        return done[ranks]
    return launch


@needs_mpi
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_cli_run_matches_multiplex(ranks, cli_cases, launches):
    # Prepare: every strategy's scenario, multiplex references in-process (7 clients: uneven slices)
    assert sorted(cli_cases) == _registered() and "fedavg" in cli_cases
    # Execute: every scenario through `fedsim run --engine mpi` on `ranks` processes
    res, out = launches(ranks)
    assert res.returncode == 0, res.stderr[-3000:]
    # Assert: same metrics and final model as multiplex; each rank held only its slice
    for name, (_, _body, (ref_hist, ref_fp, sizes)) in cli_cases.items():
        (run,) = glob.glob(str(out / f"s-{name}-[0-9]*"))
        hist = read_metrics(run)
        assert len(hist) == len(ref_hist), name
        for got, want in zip(hist, ref_hist, strict=True):
            for k in METRICS:
                assert (got.get(k) is None) == (want.get(k) is None), (name, k)
                if want.get(k) is not None:
                    assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), (name, k, got["round"])
        info = json.loads(Path(run, "summary.json").read_text())["mpi"]
        np.testing.assert_allclose(info["model_fingerprint"], ref_fp, rtol=1e-9, atol=1e-12, err_msg=name)
        assert info["ranks"] == ranks and info["replicas_identical"], name
        bounds = [7 * r // ranks for r in range(ranks + 1)]
        assert info["clients_per_rank"] == list(np.diff(bounds)), name
        assert info["data_rows_per_rank"] == [int(sizes[a:b].sum()) for a, b in pairwise(bounds)], name
        used = zip(info["state_rows_per_rank"], info["clients_per_rank"], strict=True)
        assert all(s <= c for s, c in used), name


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_loop_matches_in_process_for_every_strategy(ranks, launches):
    """Every registered strategy on quadratics, 2 and 3 ranks over 7 clients ((3, 4) and
    (2, 2, 3)), with rounds where only the last rank, nobody, or only rank 0 takes part; a stale
    (Iallreduce) reduction; gossip with two operators on a ring (2 halo rows per rank and round)
    and a random graph; robust aggregators (median, trimmed mean, Krum) under Byzantine clients and
    DP-FedAvg with noise and an adaptive clip. (tests/mpi_scripts/loop_check.py, run at the end of
    the launch.)"""
    # Execute
    res, _ = launches(ranks)
    # Assert: every case reported ok (the script aborts the job on any mismatch or exception)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    for case in ("fedavg-stale1-masks", "scaffold-uneven-work-masks", "two-key-gossip-ring",
                 "ring-halo", "two-key-gossip-random", "fedavg-median-signflip-masks",
                 "scaffold-trimmed-random-masks", "fedavg-krum-signflip-full",
                 "dp-fedavg-adaptive-noise-masks"):
        assert f"ok {case}" in res.stdout
    for name in _registered():
        assert f"ok {name}-masks" in res.stdout or f"ok {name}-ring" in res.stdout, (name, res.stdout)


@needs_mpi
def test_bad_scenario_is_rejected_on_every_rank_with_exit_2(tmp_path):
    # Prepare
    path = write_scenario(tmp_path, small_scenario(strategy={"lr": -1.0}))
    # Execute
    res = mpiexec(2, [str(BIN / "fedsim"), "run", path, "--engine", "mpi", "--quiet",
                      "--out", str(tmp_path / "runs")], timeout=90)
    # Assert: exit 2 with the one-line error (every rank prints it before exiting; mpiexec may
    # kill the slower rank once the first exits), nothing hung, no run folder
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert 1 <= len(lines) <= 2 and all("strategy.lr" in ln for ln in lines), res.stderr
    assert "Traceback" not in res.stderr
    assert not glob.glob(str(tmp_path / "runs" / "*"))


@needs_mpi
def test_more_ranks_than_clients_is_a_config_error(tmp_path):
    """Checked in the engine's build, before any communication: exit 2 naming data.clients."""
    # Prepare: 2 clients on 3 ranks
    body = small_scenario(data={"clients": 2})
    body["participation"] = {"kind": "full"}
    path = write_scenario(tmp_path, body)
    # Execute
    res = mpiexec(3, [str(BIN / "fedsim"), "run", path, "--engine", "mpi", "--quiet",
                      "--out", str(tmp_path / "runs")], timeout=90)
    # Assert
    assert res.returncode == 2, res.stderr[-2000:]
    assert "data.clients" in res.stderr and "more MPI ranks than clients" in res.stderr
    assert "Traceback" not in res.stderr


@needs_mpi
def test_exception_on_one_rank_aborts_the_job(tmp_path):
    # Prepare: a user strategy that raises on rank 1's clients in round 2 (of 5)
    body = small_scenario(rounds=5)
    body["participation"] = {"kind": "full"}
    body["strategy"] = {"name": "tests.mpi_scripts.boom:factory", "batch_size": 8}
    path = write_scenario(tmp_path, body)
    # Execute (a hang would raise TimeoutExpired)
    res = mpiexec(2, [str(BIN / "fedsim"), "run", path, "--engine", "mpi", "--quiet",
                      "--out", str(tmp_path / "runs")], timeout=90)
    # Assert
    assert res.returncode != 0
    assert "error: rank 1: RuntimeError: boom: last client, round 2" in res.stderr, res.stderr
    assert not [p for p in glob.glob(str(tmp_path / "runs" / "*")) if not p.endswith(".partial")]


def test_slice_setup_holds_only_the_slice():
    """In-process: the problem of a rank's slice keeps only its clients' rows."""
    from fedsim.config import parse_scenario
    from fedsim.engines.mpi import slice_setup
    from fedsim.setup import build_setup

    # Prepare
    setup = build_setup(parse_scenario(small_scenario()))
    owned = np.arange(3, 6)
    # Execute
    data = slice_setup(setup, owned).problem().data
    # Assert
    assert data.x.shape[0] == setup.sizes[owned].sum()
    assert torch.equal(data.sizes > 0, torch.isin(torch.arange(8), torch.as_tensor(owned)))
    full = setup.problem().data
    rows = torch.cat([torch.arange(int(full.offsets[i]), int(full.offsets[i] + full.sizes[i]))
                      for i in owned])
    assert torch.equal(data.x, full.x[rows])


def test_mix_plan_exchanges_only_boundary_rows():
    """Ring of 7 (Metropolis: 1/3 on self and both neighbours), 3 ranks own [0,2), [2,4), [4,7).

    Rank 1 owns nodes 2, 3: it reads node 1 from rank 0 and node 4 from rank 2, and sends
    node 2 to rank 0 (row 1 reads it) and node 3 to rank 2 (row 4 reads it). Its operator rows act
    on [x2, x3 | x1, x4], and reproduce rows 2, 3 of W @ x.
    """
    from fedsim.comm.mpi import MixPlan, block_starts

    # Prepare
    n = 7
    dense = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        dense[i, [i - 1, i, (i + 1) % n]] = 1 / 3
    x = torch.arange(n, dtype=torch.float64)[:, None] ** 2
    # Execute
    plan = MixPlan({"W": dense.to_sparse_csr()}, block_starts(n, 3), 1, torch.device("cpu"))
    got = torch.sparse.mm(plan.ops["W"], torch.cat([x[2:4], x[[1, 4]]]))
    # Assert
    assert plan.recv == {0: 1, 2: 1} and plan.halo_rows == 2
    assert {q: idx.tolist() for q, idx in plan.send.items()} == {0: [0], 2: [1]}
    torch.testing.assert_close(got, (dense @ x)[2:4], rtol=0, atol=1e-15)


# ---- checkpoint and resume under mpiexec -----------------------------------------------------

def _no_host(run: str) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "wall_s"} for m in read_metrics(run)]


@needs_mpi
def test_resume_on_the_same_and_another_rank_count(tmp_path):
    """SCAFFOLD (client state) and CO2 (a stale all-reduce in flight): 2 rounds on 2 ranks, then
    resumed to 5 rounds on 2 ranks (bitwise the uninterrupted 2-rank run), on 3 ranks and on the
    multiplex engine (the uninterrupted run up to summation order)."""
    # Prepare: scenarios of 2 and 5 rounds
    names = ("scaffold", "co2")
    paths = []
    for name in names:
        body = strategy_scenario(name)
        paths += [write_scenario(tmp_path, {**body, "name": f"short-{name}", "rounds": 2}, f"a-{name}.yaml"),
                  write_scenario(tmp_path, {**body, "name": f"long-{name}", "rounds": 5}, f"b-{name}.yaml")]
    res = mpiexec(2, [sys.executable, "tests/mpi_scripts/run_many.py", str(tmp_path / "runs"), *paths],
                  timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    short = {n: glob.glob(str(tmp_path / "runs" / f"short-{n}-[0-9]*"))[0] for n in names}
    copies = {}
    for n in names:
        for tag in ("r2", "r3", "mx"):
            copies[n, tag] = shutil.copytree(short[n], tmp_path / tag / Path(short[n]).name)
    # Execute: resume on 2 ranks, on 3 ranks, and in-process
    on2 = mpiexec(2, [sys.executable, "tests/mpi_scripts/resume_many.py", "5",
                      *(str(copies[n, "r2"]) for n in names)], timeout=600)
    on3 = mpiexec(3, [sys.executable, "tests/mpi_scripts/resume_many.py", "5",
                      *(str(copies[n, "r3"]) for n in names)], timeout=600)
    from fedsim.cli import main

    local = [main(["resume", str(copies[n, "mx"]), "--set", "rounds=5", "--engine", "multiplex",
                   "--quiet"]) for n in names]
    # Assert
    assert on2.returncode == 0 and on3.returncode == 0, on2.stderr[-2000:] + on3.stderr[-2000:]
    assert local == [0, 0]
    for n in names:
        (ref,) = glob.glob(str(tmp_path / "runs" / f"long-{n}-[0-9]*"))
        want = _no_host(ref)
        assert _no_host(str(copies[n, "r2"])) == want, n
        for tag in ("r3", "mx"):
            got = _no_host(str(copies[n, tag]))
            assert len(got) == len(want) == 5, (n, tag)
            for g, w in zip(got, want, strict=True):
                for k in METRICS:
                    if w.get(k) is not None:
                        assert g[k] == pytest.approx(w[k], rel=1e-9, abs=1e-12), (n, tag, k, g["round"])


def _rank_pids(marker: str) -> list[int]:
    """Pids of the processes whose command line contains `marker` (the MPI ranks)."""
    out = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines()
            if marker in line and line.split()[1].endswith(("python", "python3"))]


@needs_mpi
def test_sigterm_to_one_rank_stops_every_rank_at_one_round_and_resumes(tmp_path):
    """SIGTERM to one rank only: every rank agrees on the stopping round, the checkpoint holds
    both ranks' clients, the job exits 143, and a 3-rank resume gives the uninterrupted run."""
    # Prepare: a long 2-rank run checkpointing every round
    body = {**strategy_scenario("scaffold"), "rounds": 200, "checkpoint": {"every": 1}}
    path = write_scenario(tmp_path, body, "long-sigterm.yaml")
    out = tmp_path / "runs"
    flags = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([MPIEXEC, *flags, "-n", "2", str(BIN / "fedsim"), "run", path, "--engine",
                             "mpi", "--quiet", "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time

    end = time.monotonic() + 600
    while not list(out.glob("*.partial/checkpoint/latest")) and time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    (run,) = out.glob("*.partial")
    pids = _rank_pids("long-sigterm.yaml")
    assert len(pids) == 2, subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True,
                                          text=True).stdout
    # Execute: SIGTERM to one rank, then resume on 3 ranks
    os.kill(max(pids), 15)
    _, err = proc.communicate(timeout=600)
    stopped = json.loads((run / "summary.json").read_text())
    res = mpiexec(3, [sys.executable, "tests/mpi_scripts/resume_many.py", "200", str(run)], timeout=900)
    # Assert: interrupted cleanly, then the uninterrupted run's metrics (up to summation order)
    assert proc.returncode == 143, err[-2000:]
    assert stopped["status"] == "interrupted" and "Traceback" not in err
    assert res.returncode == 0, res.stderr[-2000:]
    final = str(run).removesuffix(".partial")
    ref = _reference({**body, "name": "ref"})[0]
    got = read_metrics(final)
    assert len(got) == len(ref) == 200
    for g, w in zip(got, ref, strict=True):
        for k in ("train_loss", "test_loss", "bytes_up", "sim_time_s"):
            assert (g[k] is None) == (w[k] is None), (k, g["round"])  # None: nobody took part
            if w[k] is not None:
                assert g[k] == pytest.approx(w[k], rel=1e-9, abs=1e-12), (k, g["round"])
