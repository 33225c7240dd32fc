"""Optional trackers, offline: TensorBoard event files read back with tensorboard's reader, an
MLflow file store read back with MLflow's client; JSONL stays the source of truth."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import read_metrics, run_cli, small_scenario, write_scenario

METRICS = ("train_loss", "test_loss", "test_accuracy", "bytes_up", "bytes_down")


@pytest.fixture(autouse=True)
def _no_ambient_mlflow(monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)


def _run(tmp_path, capsys, trackers, out="runs"):
    sc = write_scenario(tmp_path, small_scenario(output={"trackers": trackers}))
    code, stdout, err = run_cli(["run", sc, "--out", str(tmp_path / out), "--quiet"], capsys)
    assert code == 0, err
    return stdout.strip().splitlines()[-1], err


def test_tensorboard_event_files_hold_the_metrics(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, _ = _run(tmp_path, capsys, ["tensorboard"])
    acc = EventAccumulator(os.path.join(path, "tensorboard"))
    acc.Reload()
    rows = read_metrics(path)
    assert set(METRICS) <= set(acc.Tags()["scalars"])
    for key in METRICS:
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["round"] for r in rows]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)
    (text,) = acc.Tensors("summary/text_summary")  # the summary, as text
    assert b'"status": "ok"' in text.tensor_proto.string_val[0]


def test_mlflow_file_store_holds_params_metrics_and_status(tmp_path, capsys):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    path, _ = _run(tmp_path, capsys, ["mlflow"])
    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())
    exp = client.get_experiment_by_name("runs")  # named after the parent folder
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params["strategy.lr"] == "0.1" and run.data.params["seed"] == "3"
    assert run.data.tags["fedsim.run_dir"] == os.path.abspath(path)
    rows = read_metrics(path)
    for key in METRICS:
        hist = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in hist] == [(r["round"], float(r[key])) for r in rows]


def test_mlflow_runs_of_a_sweep_go_to_the_sweep_folder(tmp_path, capsys):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    sc = write_scenario(tmp_path, small_scenario(output={"trackers": ["mlflow"]}))
    code, _, err = run_cli(["sweep", sc, "--out", str(tmp_path / "sw"), "--quiet",
                            "--seeds", "0-1"], capsys)
    assert code == 0, err
    client = MlflowClient(tracking_uri=(tmp_path / "sw" / "mlruns").as_uri())
    exp = client.get_experiment_by_name("sw")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == ["tiny", "tiny"]  # one experiment, two seeds
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]


def test_a_failing_tracker_never_stops_the_run(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    path, err = _run(tmp_path, capsys, ["mlflow"])
    assert "warning: tracker mlflow could not start" in err
    assert json.load(open(os.path.join(path, "summary.json")))["status"] == "ok"


def test_tracker_names_and_missing_packages_are_bad_input(tmp_path, capsys, monkeypatch):
    sc = write_scenario(tmp_path, small_scenario(output={"trackers": ["wandb"]}))
    code, _, err = run_cli(["run", sc, "--out", str(tmp_path / "runs"), "--quiet"], capsys)
    assert code == 2 and "output.trackers" in err and "tensorboard" in err and "mlflow" in err
    import fedsim.trackers

    monkeypatch.setitem(fedsim.trackers.PACKAGES, "tensorboard", "fedsim_no_such_package")
    sc = write_scenario(tmp_path, small_scenario(output={"trackers": ["tensorboard"]}), "b.yaml")
    code, _, err = run_cli(["run", sc, "--out", str(tmp_path / "runs2"), "--quiet"], capsys)
    assert code == 2 and "output.trackers" in err and "fedsim-lab[track]" in err
    assert not (tmp_path / "runs2").exists()  # nothing written
