"""fedsim sweep: the points, the sweep folder and its index, resumption, failed and interrupted
points, parallel and MPI points, Slurm arrays through submitit's local executor, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedsim.errors import ConfigError
from fedsim.sweep import Point, check_section, parse_seeds, point_raw, points
from fedsim.sweep_run import child_env
from tests.conftest import read_metrics, run_cli, small_scenario, write_scenario

FLAKY = {"kind": "tests.sweep_plugins:Flaky"}  # fail: never | error | interrupt | sigterm


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def _index(sweep_dir) -> dict:
    with open(os.path.join(sweep_dir, "sweep.json")) as fh:
        return {p["id"]: p for p in json.load(fh)["points"]}


def _sweep(capsys, sc, out, *args):
    code, stdout, err = run_cli(["sweep", sc, "--out", str(out), "--quiet", *args], capsys)
    return code, stdout, err


# --- points ------------------------------------------------------------------------------------

def test_points_are_the_product_of_cases_grid_and_seeds_seed_major():
    spec = check_section({"cases": {"pattern": {"a": {"participation.kind": "full"}, "b": {}}},
                          "grid": {"strategy.lr": [0.1, 0.2], "strategy.name": ["fedavg"]},
                          "seeds": "0-1"})
    pts = points(spec, default_seed=9)
    assert [p.id for p in pts[:4]] == [
        "pattern=a,lr=0.1,strategy=fedavg,seed=0", "pattern=a,lr=0.2,strategy=fedavg,seed=0",
        "pattern=b,lr=0.1,strategy=fedavg,seed=0", "pattern=b,lr=0.2,strategy=fedavg,seed=0"]
    assert len(pts) == 8 and [p.seed for p in pts] == [0] * 4 + [1] * 4
    assert pts[0].overrides == (("participation.kind", "full"), ("strategy.lr", 0.1),
                                ("strategy.name", "fedavg"), ("seed", 0))
    assert pts[2].overrides == (("strategy.lr", 0.1), ("strategy.name", "fedavg"), ("seed", 0))
    assert pts[4].label == pts[0].label == "pattern=a,lr=0.1,strategy=fedavg"
    # no axes: one point at the scenario's seed; ambiguous last components use the full key
    assert points(check_section({}), 9, "tiny") == [Point("seed=9", "tiny", 9, (("seed", 9),))]
    amb = points(check_section({"grid": {"a.x": [1], "b.x": [2]}}), 0)
    assert amb[0].id == "a.x=1,b.x=2,seed=0"


def test_parse_seeds():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,2,7") == [0, 2, 7]
    assert parse_seeds("0-2,9") == [0, 1, 2, 9]
    assert parse_seeds(3) == [3] and parse_seeds([1, 5]) == [1, 5] and parse_seeds(None) is None
    for bad, why in [("5-2", "descending"), ("a", "look like"), ("1,1", "twice"), ("-1", "look like"),
                     ([], "no seeds")]:
        with pytest.raises(ConfigError, match=why):
            parse_seeds(bad)


def test_point_overrides_keep_their_values_exactly():
    base = small_scenario()
    p = Point("x", "x", 2, (("strategy.lr", 1e-05), ("participation", {"kind": "full"}),
                            ("strategy.momentum_flag", True), ("data.note", "1e-05"), ("seed", 2)))
    raw = point_raw(base, p)
    assert raw["strategy"]["lr"] == 1e-05 and isinstance(raw["strategy"]["lr"], float)
    assert raw["participation"] == {"kind": "full"}  # a mapping replaces the section, like --set
    assert raw["strategy"]["momentum_flag"] is True and raw["data"]["note"] == "1e-05"
    assert raw["seed"] == 2 and raw["name"] == "x" and base["seed"] == 3  # base untouched


# --- running -----------------------------------------------------------------------------------

def test_sweep_points_equal_direct_runs_and_yaml_equals_flags(tmp_path, capsys):
    body = small_scenario()
    body["sweep"] = {"grid": {"strategy.lr": [0.05, 0.1]}, "seeds": "0-1"}
    sc = write_scenario(tmp_path, body)
    code, out, err = _sweep(capsys, sc, tmp_path / "sw")
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(tmp_path / "sw")
    idx = _index(tmp_path / "sw")
    ids = ["lr=0.05,seed=0", "lr=0.1,seed=0", "lr=0.05,seed=1", "lr=0.1,seed=1"]
    assert list(idx) == ids and all(idx[i]["status"] == "ok" for i in ids)
    assert idx["lr=0.1,seed=1"]["label"] == "lr=0.1" and idx["lr=0.1,seed=1"]["attempts"] == 1
    for pid in ids:
        cfg = yaml.safe_load(open(tmp_path / "sw" / pid / "config.yaml"))
        assert "sweep" not in cfg and cfg["name"] == pid.rsplit(",", 1)[0]  # the label
    # a point equals `fedsim run` with the same overrides, apart from host times
    plain = write_scenario(tmp_path, small_scenario(), "plain.yaml")
    code, out, _ = run_cli(["run", plain, "--out", str(tmp_path / "runs"), "--quiet", "--set",
                            "strategy.lr=0.1", "--set", "seed=1"], capsys)
    assert code == 0
    direct = out.strip().splitlines()[-1]
    assert _strip(read_metrics(tmp_path / "sw" / "lr=0.1,seed=1")) == _strip(read_metrics(direct))
    assert _strip(read_metrics(tmp_path / "sw" / "lr=0.1,seed=0")) != _strip(read_metrics(direct))
    # the same sweep from flags
    code, _, err = _sweep(capsys, plain, tmp_path / "flags", "--grid", "strategy.lr=0.05,0.1",
                          "--seeds", "0-1")
    assert code == 0, err and list(_index(tmp_path / "flags")) == ids
    for pid in ids:
        assert _strip(read_metrics(tmp_path / "flags" / pid)) == \
            _strip(read_metrics(tmp_path / "sw" / pid))


def test_rerun_skips_finished_points_and_reruns_unfinished_ones(tmp_path, capsys):
    sc = write_scenario(tmp_path, small_scenario())
    args = ("--grid", "strategy.lr=0.05,0.1")
    assert _sweep(capsys, sc, tmp_path / "sw", *args)[0] == 0
    keep = tmp_path / "sw" / "lr=0.05,seed=3"
    before = (keep / "summary.json").stat().st_mtime_ns
    # a driver killed mid-point: the index says running, the folder is missing
    shutil.rmtree(tmp_path / "sw" / "lr=0.1,seed=3")
    doc = json.load(open(tmp_path / "sw" / "sweep.json"))
    doc["points"][1]["status"] = "running"
    json.dump(doc, open(tmp_path / "sw" / "sweep.json", "w"))
    code, _, err = run_cli(["sweep", sc, "--out", str(tmp_path / "sw"), *args], capsys)
    assert code == 0, err
    assert "1 had finished before" in err and "[1/1] ok" in err
    idx = _index(tmp_path / "sw")
    assert idx["lr=0.1,seed=3"]["status"] == "ok" and idx["lr=0.1,seed=3"]["attempts"] == 2
    assert idx["lr=0.05,seed=3"]["attempts"] == 1
    assert (keep / "summary.json").stat().st_mtime_ns == before
    # a grown sweep runs only the new points
    code, _, err = run_cli(["sweep", sc, "--out", str(tmp_path / "sw"), *args, "--seeds", "3-4"],
                           capsys)
    assert code == 0 and "2 had finished before" in err and len(_index(tmp_path / "sw")) == 4


def test_a_failed_point_is_recorded_and_the_others_still_run(tmp_path, capsys):
    sc = write_scenario(tmp_path, small_scenario(model=FLAKY))
    args = ("--grid", "model.fail=error,never", "--seeds", "0-1")
    code, _, err = run_cli(["sweep", sc, "--out", str(tmp_path / "sw"), *args], capsys)
    assert code == 1
    idx = _index(tmp_path / "sw")
    assert [idx[f"fail=never,seed={s}"]["status"] for s in (0, 1)] == ["ok", "ok"]
    for s in (0, 1):
        bad = idx[f"fail=error,seed={s}"]
        assert bad["status"] == "failed" and bad["error"] == "RuntimeError: boom in forward"
        assert f"failed fail=error,seed={s}: RuntimeError: boom in forward" in err
        assert not (tmp_path / "sw" / f"fail=error,seed={s}").exists()
    # the model fails in the engine's set-up (its execution-plan calibration runs it), before the
    # run folder exists: the failed attempts leave nothing half-written
    assert not [p.name for p in (tmp_path / "sw").iterdir() if p.name.endswith(".partial")]
    code, _, err = run_cli(["sweep", sc, "--out", str(tmp_path / "sw"), *args], capsys)
    assert code == 1 and "2 had finished before" in err
    assert _index(tmp_path / "sw")["fail=error,seed=0"]["attempts"] == 2


@pytest.mark.parametrize("how,code", [("interrupt", 130), ("sigterm", 143)])
def test_an_interrupted_point_stops_the_sweep_cleanly(tmp_path, capsys, how, code):
    handler = signal.getsignal(signal.SIGTERM)
    sc = write_scenario(tmp_path, small_scenario(model=FLAKY))
    got, _, err = _sweep(capsys, sc, tmp_path / "sw", "--grid", f"model.fail={how},never")
    assert got == code and "rerun the same command" in err
    idx = _index(tmp_path / "sw")
    assert idx[f"fail={how},seed=3"]["status"] == "interrupted"
    assert idx["fail=never,seed=3"]["status"] == "pending"
    assert signal.getsignal(signal.SIGTERM) is handler


def test_an_interrupted_point_resumes_from_its_checkpoint(tmp_path, capsys, monkeypatch):
    """SIGTERM in round 2 of 6 (checkpoints every round): the sweep stops with 143; rerunning it
    resumes the attempt (`fedsim resume`) instead of starting afresh, and the point's metrics
    are the uninterrupted run's."""
    # Prepare
    monkeypatch.setenv("FEDSIM_TEST_MARKER", str(tmp_path / "marker"))
    body = small_scenario(model={**FLAKY, "fail": "sigterm-once"}, rounds=6, checkpoint={"every": 1},
                          participation={"kind": "full"})
    sc = write_scenario(tmp_path, body)
    ref = write_scenario(tmp_path, {**body, "model": {**FLAKY, "fail": "never"}}, "ref.yaml")
    assert _sweep(capsys, ref, tmp_path / "ref", "--seeds", "0")[0] == 0
    # Execute: interrupted, then the same command again
    first = _sweep(capsys, sc, tmp_path / "sw", "--seeds", "0")[0]
    (attempt,) = (tmp_path / "sw").glob("*.partial")
    rounds_before = len(read_metrics(str(attempt)))
    second = _sweep(capsys, sc, tmp_path / "sw", "--seeds", "0")[0]
    # Assert
    assert first == 143 and second == 0
    assert 1 <= rounds_before < 6
    idx = _index(tmp_path / "sw")
    (pid,) = idx
    assert idx[pid]["status"] == "ok" and idx[pid]["attempts"] == 2
    strip = lambda ms: [{k: v for k, v in m.items() if k != "wall_s"} for m in ms]  # noqa: E731
    got = strip(read_metrics(str(tmp_path / "sw" / pid)))
    (ref_pid,) = _index(tmp_path / "ref")
    assert got == strip(read_metrics(str(tmp_path / "ref" / ref_pid)))
    assert not list((tmp_path / "sw").glob("*.partial"))  # the attempt became the point's folder


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_a_signal_to_the_driver_interrupts_its_child_processes(tmp_path, sigint):
    """The driver (a real process) gets SIGTERM from one of its points (Ctrl-C takes the same
    path), forwards SIGINT to the running children, records them as interrupted and exits 143.
    Also when the driver starts with SIGINT ignored (a background job of a script): its points,
    interrupted while setting up, must not inherit that."""
    sig, code = "sigterm", 143
    sc = write_scenario(tmp_path, small_scenario(model=FLAKY))
    res = subprocess.run([sys.executable, "-m", "fedsim", "sweep", sc, "--out", str(tmp_path / "sw"),
                          "--jobs", "2", "--grid", f"model.fail={sig}-parent,never",
                          "--seeds", "0-2"], capture_output=True, text=True, timeout=50,
                         env=child_env(1), preexec_fn=_ignore_sigint if sigint == "ignored" else None)
    assert res.returncode == code, res.stderr[-2000:]
    assert "sweep interrupted: rerun the same command to continue" in res.stderr
    idx = _index(tmp_path / "sw")
    assert idx[f"fail={sig}-parent,seed=0"]["status"] == "interrupted"
    assert {p["status"] for p in idx.values()} <= {"ok", "interrupted", "pending"}
    assert idx[f"fail={sig}-parent,seed=2"]["status"] == "pending"  # never started


def test_parallel_jobs_equal_the_sequential_sweep(tmp_path, capsys):
    sc = write_scenario(tmp_path, small_scenario(model=FLAKY))
    assert _sweep(capsys, sc, tmp_path / "seq", "--grid", "model.fail=never", "--seeds", "0-1")[0] == 0
    code, _, err = _sweep(capsys, sc, tmp_path / "par", "--grid", "model.fail=never,error",
                          "--seeds", "0-1", "--jobs", "3")
    assert code == 1
    idx = _index(tmp_path / "par")
    assert idx["fail=error,seed=0"]["status"] == idx["fail=error,seed=1"]["status"] == "failed"
    assert idx["fail=error,seed=1"]["error"] == "RuntimeError: boom in forward"
    for pid in ("fail=never,seed=0", "fail=never,seed=1"):
        assert idx[pid]["status"] == "ok"
        assert _strip(read_metrics(tmp_path / "par" / pid)) == \
            _strip(read_metrics(tmp_path / "seq" / pid))


def test_child_processes_get_a_share_of_the_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    env = child_env(3)
    assert env["OMP_NUM_THREADS"] == "3" and env["MKL_NUM_THREADS"] == "7"  # the user's choice wins
    assert str(Path(__file__).resolve().parents[1]) in env["PYTHONPATH"].split(os.pathsep)


BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")


@pytest.mark.mpi
@pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec (the [mpi] extra)")
def test_an_mpi_point_runs_under_mpiexec(tmp_path, capsys):
    version = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True).stdout
    flags = "--oversubscribe" + (" --allow-run-as-root" if os.geteuid() == 0 else "") \
        if "Open MPI" in version else ""
    body = small_scenario()
    sc = write_scenario(tmp_path, body, "plex.yaml")
    assert _sweep(capsys, sc, tmp_path / "plex")[0] == 0
    body["engine"] = {"kind": "mpi", "dtype": "float64"}
    body["sweep"] = {"ranks": 2, "mpiexec": f"{MPIEXEC} {flags} -n {{ranks}}"}
    code, _, err = _sweep(capsys, write_scenario(tmp_path, body, "mpi.yaml"), tmp_path / "mpi")
    assert code == 0, err
    run = tmp_path / "mpi" / "seed=3"
    assert json.load(open(run / "summary.json"))["mpi"]["ranks"] == 2
    for a, b in zip(read_metrics(run), read_metrics(tmp_path / "plex" / "seed=3"), strict=True):
        assert a["round"] == b["round"] and a["bytes_up"] == b["bytes_up"]
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-9)


def _sweep_process(sc: str, out: Path, *args: str) -> tuple[int, str]:
    """`fedsim sweep` as a real process: submitit's executors and log handlers must not bind to a
    test's captured stdio (in-process they outlived it: "lost sys.stderr" at pytest's exit)."""
    res = subprocess.run([sys.executable, "-m", "fedsim", "sweep", sc, "--out", str(out), "--quiet",
                          *args], capture_output=True, text=True, timeout=600, env=child_env(1))
    return res.returncode, res.stderr


def test_slurm_launcher_runs_a_job_array_with_submitits_local_executor(tmp_path):
    from importlib.util import find_spec

    assert find_spec("submitit") is not None, "the slurm extra installs submitit"  # not imported here
    sc = write_scenario(tmp_path, small_scenario(model=FLAKY))
    code, err = _sweep_process(sc, tmp_path / "seq", "--grid", "model.fail=never")
    assert code == 0, err[-3000:]
    code, err = _sweep_process(sc, tmp_path / "sl", "--grid", "model.fail=never,error", "--launcher",
                               "slurm", "--submitit", "cluster=local", "--submitit", "timeout_min=5")
    assert code == 1, err[-3000:]
    idx = _index(tmp_path / "sl")
    ok, bad = idx["fail=never,seed=3"], idx["fail=error,seed=3"]
    assert ok["status"] == "ok" and ok["job_id"] and bad["status"] == "failed"
    assert bad["error"] == "RuntimeError: boom in forward"
    assert _strip(read_metrics(tmp_path / "sl" / "fail=never,seed=3")) == \
        _strip(read_metrics(tmp_path / "seq" / "fail=never,seed=3"))
    # bad executor parameters, and MPI points without real Slurm tasks: exit 2, nothing runs
    code, err = _sweep_process(sc, tmp_path / "x", "--launcher", "slurm", "--submitit", "cluster=local",
                               "--submitit", "slurm_partitionn=gpu")
    assert code == 2 and "sweep.submitit" in err and "partitionn" in err
    if shutil.which("srun") is None:  # this machine is no Slurm cluster
        code, err = _sweep_process(sc, tmp_path / "x", "--launcher", "slurm")
        assert code == 2 and "sweep.submitit.cluster" in err and "srun" in err
    mpi = write_scenario(tmp_path, small_scenario(engine={"kind": "mpi"}), "mpi.yaml")
    code, err = _sweep_process(mpi, tmp_path / "x", "--launcher", "slurm", "--submitit", "cluster=local")
    assert code == 2 and "sweep.submitit.cluster" in err and not (tmp_path / "x").exists()


# --- dry run and bad input ---------------------------------------------------------------------

def test_dry_run_lists_and_validates_every_point_and_writes_nothing(tmp_path, capsys):
    sc = write_scenario(tmp_path, small_scenario())
    code, out, _ = _sweep(capsys, sc, tmp_path / "sw", "--grid", "strategy.lr=0.05,0.1",
                          "--seeds", "0-1", "--dry-run")
    assert code == 0 and "4 points" in out and "all 4 points are valid" in out
    assert sum("pending" in line for line in out.splitlines()) == 4
    assert "lr=0.1,seed=1" in out and not (tmp_path / "sw").exists()
    # a value only the second point has; one that only fails when the point is built
    for grid, point, key in [("strategy.lr=0.1,abc", "lr=abc,seed=3", "strategy.lr"),
                             ("participation.clients_per_round=4,99", "clients_per_round=99,seed=3",
                              "participation")]:
        code, _, err = _sweep(capsys, sc, tmp_path / "sw", "--grid", grid, "--dry-run")
        assert code == 2 and f"[point {point}]" in err and key in err, err
        assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("args,sweep,expect", [
    (["--grid", "strategy.lrr=0.1"], None, ["strategy.lrr", "unknown", "[point lrr=0.1,seed=3]"]),
    (["--grid", "strategy.lr="], None, ["--grid strategy.lr", "empty grid"]),
    (["--grid", "strategy.lr"], None, ["--grid", "dotted.key=v1,v2"]),
    ([], {"grid": {"strategy.lr": []}}, ["sweep.grid.strategy.lr", "empty grid"]),
    ([], {"cases": {"pattern": {}}}, ["sweep.cases.pattern", "at least one case"]),
    (["--seeds", "5-2"], None, ["--seeds", "descending seed range 5-2"]),
    ([], {"seeds": "5-2"}, ["sweep.seeds", "descending"]),
    (["--jobs", "0"], None, ["--jobs", "must be >= 1", "(got 0)"]),
    ([], {"jobs": 0}, ["sweep.jobs"]),
    (["--grid", "seed=1,2"], None, ["set by the sweep itself", "--seeds"]),
    (["--grid", "name=a,b"], None, ["set by the sweep itself"]),
    ([], {"grd": {}}, ["sweep.grd", "unknown key"]),
    ([], {"launcher": "pbs"}, ["sweep.launcher"]),
])
def test_bad_sweep_input_exits_2_naming_what_and_where(tmp_path, capsys, args, sweep, expect):
    body = small_scenario()
    if sweep is not None:
        body["sweep"] = sweep
    sc = write_scenario(tmp_path, body)
    code, _, err = _sweep(capsys, sc, tmp_path / "sw", *args)
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for piece in expect:
        assert piece in err, (piece, err)
    assert not (tmp_path / "sw").exists()


def test_a_changed_scenario_does_not_reuse_finished_points(tmp_path, capsys):
    sc = write_scenario(tmp_path, small_scenario())
    assert _sweep(capsys, sc, tmp_path / "sw")[0] == 0
    code, _, err = _sweep(capsys, sc, tmp_path / "sw", "--set", "strategy.local_steps=2")
    assert code == 2 and "point seed=3 already ran with strategy.local_steps=3" in err
    assert "local_steps=2" in err and str(tmp_path / "sw") in err


def test_run_and_validate_accept_a_sweep_file(tmp_path, capsys):
    body = small_scenario()
    body["sweep"] = {"grid": {"strategy.lr": [0.05, 0.1]}}
    sc = write_scenario(tmp_path, body)
    code, out, _ = run_cli(["run", sc, "--out", str(tmp_path / "runs"), "--quiet"], capsys)
    assert code == 0  # the base scenario; the section is not part of the run
    cfg = yaml.safe_load(open(os.path.join(out.strip().splitlines()[-1], "config.yaml")))
    assert "sweep" not in cfg and cfg["strategy"]["lr"] == 0.1
    body["sweep"] = {"grid": {"strategy.lr": []}}
    code, _, err = run_cli(["validate", write_scenario(tmp_path, body, "bad.yaml")], capsys)
    assert code == 2 and "bad.yaml: sweep.grid.strategy.lr: empty grid" in err


def test_the_fedau_sweep_is_the_former_per_pattern_runs():
    """scenarios/paper/fedau/sweep.yaml resolves, point for point, to the scenarios the former
    run.sh ran: <pattern>.yaml with each strategy's --set flags (seed 0; names aside)."""
    from fedsim.config import load_scenario, read_yaml, to_dict
    from fedsim.sweep import validate_point

    here = Path(__file__).resolve().parents[1] / "scenarios" / "paper" / "fedau"
    raw = read_yaml(str(here / "sweep.yaml"))
    spec = check_section(raw.pop("sweep"))
    flags = {"fedau": [], "fedau-k50": ["strategy.cutoff=50"],
             "known-prob": ["strategy.name=known-prob"],
             "fedavg": ["strategy.name=fedavg", "strategy.weighting=uniform"],
             "fedavg-all": ["strategy.name=fedavg-all", "strategy.server_lr=10"],
             "fedvarp": ["strategy.name=fedvarp"], "mifa": ["strategy.name=mifa"]}
    pts = [p for p in points(spec, 0) if p.seed == 0]
    assert len(pts) == 21 and parse_seeds(spec.seeds) == [0, 1, 2]
    for p in pts:
        pattern, strategy = (part.split("=")[1] for part in p.label.split(","))
        old = to_dict(load_scenario(str(here / f"{pattern}.yaml"), flags[strategy]))
        new = to_dict(validate_point(raw, p, "sweep.yaml", build=False))
        assert {**new, "name": None} == {**old, "name": None}, p.id


def test_only_the_first_sigterm_breaks_into_the_driver(monkeypatch):
    """Two points may signal the driver at once: the second SIGTERM is recorded but must not
    raise inside the clean-up that interrupts the running points (it would leave the driver
    waiting on children nobody told to stop)."""
    from fedsim import sweep_driver

    monkeypatch.setattr(sweep_driver, "_TERMINATED", [])
    with pytest.raises(KeyboardInterrupt):
        sweep_driver._on_sigterm(signal.SIGTERM, None)
    sweep_driver._on_sigterm(signal.SIGTERM, None)  # no second KeyboardInterrupt
    assert sweep_driver._TERMINATED == [True, True]
