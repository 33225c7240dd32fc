"""A model that does not fit the data (wrong input size, wrong number of outputs) is bad input in
every command that would run it: `fedsim run`, `fedsim sweep`, each MPI rank, `fedsim
export-flower` and the exported Flower app exit 2 with `fedsim validate`'s one line (scenario
file, `model.kind`, the shapes), before any run, sweep or export folder exists. Real `fedsim`
processes: the exit code and stderr are the user's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, small_scenario, write_scenario
from tests.test_mpi import mpiexec, needs_mpi

BIN = Path(sys.executable).parent

# (model, what the line must hold): the data are 60 synthetic features, 10 classes, the fit
# check's batch is 2 training rows
MISFITS = [
    ("tests.reliability_plugins:WrongOutputs",
     ["model.kind", "the model outputs (2, 3) for a batch of 2", "the data has 10 classes",
      "logits of shape [batch, 10]"]),
    ("tests.reliability_plugins:WrongInputs",
     ["model.kind", "does not accept the data's inputs of shape (60,)", "2x60 and 7x10"]),
]


def fedsim(*args: str) -> subprocess.CompletedProcess:
    """`fedsim ARGS` in a fresh process from the repository root (the dotted plug-ins import)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                       if p)}
    return subprocess.run([str(BIN / "fedsim"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def one_line(res: subprocess.CompletedProcess, kind: str, needles: list[str], file: str = "bad.yaml") -> str:
    """The refusal: exit 2, one line naming the file, the key, the model and the shapes."""
    assert res.returncode == 2, res.stderr
    err = res.stderr
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{file}: model.kind: " in err and f"(got '{kind}')" in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def empty(folder: Path) -> bool:
    return not folder.exists() or not list(folder.iterdir())


@pytest.mark.parametrize("kind,needles", MISFITS)
def test_run_refuses_a_model_that_does_not_fit_as_validate_does(tmp_path, kind, needles):
    path = write_scenario(tmp_path, small_scenario(model={"kind": kind}), "bad.yaml")
    out = tmp_path / "runs"
    ran = one_line(fedsim("run", path, "--out", str(out), "--quiet"), kind, needles)
    checked = one_line(fedsim("validate", path), kind, needles)
    assert ran == checked  # one check, one message
    assert empty(out)  # refused before the run folder: nothing half-written


def test_resume_refuses_a_model_that_no_longer_fits(tmp_path):
    """A run folder whose config.yaml now names a misfit model (an edited plug-in, a --set)."""
    path = write_scenario(tmp_path, small_scenario(rounds=2, checkpoint={"every": 1}))
    out = tmp_path / "runs"
    res = fedsim("run", path, "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    (folder,) = out.iterdir()
    before = sorted(p.name for p in folder.rglob("*"))
    kind, needles = MISFITS[0]
    res = fedsim("resume", str(folder), "--quiet", "--set", "rounds=4", "--set", f"model={{kind: {kind}}}")
    one_line(res, kind, needles, file="config.yaml")
    assert sorted(p.name for p in folder.rglob("*")) == before


def test_sweep_refuses_a_point_whose_model_does_not_fit(tmp_path):
    """Every point is checked before the sweep folder exists; the line names the point."""
    kind, needles = MISFITS[0]
    path = write_scenario(tmp_path, small_scenario(model={"kind": kind}), "bad.yaml")
    out = tmp_path / "sw"
    res = fedsim("sweep", path, "--out", str(out), "--grid", "strategy.lr=0.05,0.1", "--quiet")
    one_line(res, kind, needles, file="bad.yaml [point lr=0.05,seed=3]")
    assert not out.exists()


@needs_mpi
def test_every_mpi_rank_refuses_a_model_that_does_not_fit(tmp_path):
    kind, needles = MISFITS[1]
    body = small_scenario(model={"kind": kind})
    body["participation"] = {"kind": "full"}
    path = write_scenario(tmp_path, body, "bad.yaml")
    out = tmp_path / "runs"
    res = mpiexec(2, [str(BIN / "fedsim"), "run", path, "--engine", "mpi", "--quiet", "--out", str(out)],
                  timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    # every rank prints it before exiting; mpiexec may kill the slower rank once the first exits
    assert 1 <= len(lines) <= 2 and "Traceback" not in res.stderr, res.stderr
    for line in lines:
        assert "bad.yaml: model.kind: " in line and all(n in line for n in needles), line
    assert empty(out)


@pytest.mark.parametrize("kind,needles", MISFITS)
def test_export_flower_refuses_a_model_that_does_not_fit_as_validate_does(tmp_path, kind, needles):
    path = write_scenario(tmp_path, small_scenario(model={"kind": kind}), "bad.yaml")
    app = tmp_path / "app"
    exported = one_line(fedsim("export-flower", path, str(app)), kind, needles)
    assert exported == one_line(fedsim("validate", path), kind, needles)
    assert not app.exists()  # refused before the folder is made


def test_export_flower_refuses_a_misfit_given_by_set_and_leaves_the_folder_as_it_was(tmp_path):
    """A misfit model from `--set`, exported with --force into the user's folder: nothing written."""
    path = write_scenario(tmp_path, small_scenario())
    kind, needles = MISFITS[0]
    app = tmp_path / "app"
    app.mkdir()
    (app / "notes.txt").write_text("mine")
    res = fedsim("export-flower", path, str(app), "--force", "--set", f"model={{kind: {kind}}}")
    one_line(res, kind, needles, file="scenario.yaml")
    assert [p.name for p in app.iterdir()] == ["notes.txt"] and (app / "notes.txt").read_text() == "mine"


@pytest.mark.flower
def test_the_exported_app_refuses_a_scenario_whose_model_does_not_fit(tmp_path):
    """The exported ServerApp runs whatever scenario its run config names (`flwr run --run-config
    "scenario='...'"`, an edited scenario.yaml), not only the one the export checked: it checks
    that one too, before its run folder. Here under `fedsim flower-run`, a real process."""
    app = tmp_path / "app"
    res = fedsim("export-flower", write_scenario(tmp_path, small_scenario(rounds=1)), str(app))
    assert res.returncode == 0, res.stderr
    kind, needles = MISFITS[1]
    write_scenario(app, small_scenario(model={"kind": kind}), "bad.yaml")
    res = fedsim("flower-run", "fedsim_app.server_app:app", "fedsim_app.client_app:app", "--app-dir",
                 str(app), "--nodes", "8", "--run-config", "scenario='bad.yaml'")
    one_line(res, kind, needles, file=str(app / "bad.yaml"))
    assert not (app / "runs").exists()
