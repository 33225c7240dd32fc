"""The CLI end to end: run folder contents, determinism, list/topology/plot/compare, lazy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from tests.conftest import ROOT, read_metrics, run_cli


def _run(scenario_file, tmp_path, capsys, *extra):
    code, out, err = run_cli(["run", scenario_file, "--out", str(tmp_path / "runs"), "--quiet", *extra],
                             capsys)
    assert code == 0, err
    path = out.strip().splitlines()[-1]
    assert os.path.isdir(path) and not path.endswith(".partial")
    return path


def test_run_folder_contents(scenario_file, tmp_path, capsys):
    path = _run(scenario_file(), tmp_path, capsys)
    cfg = yaml.safe_load(open(os.path.join(path, "config.yaml")))
    # fully resolved: defaults of every plug-in are filled in
    assert cfg["strategy"]["server_lr"] == 1.0 and cfg["engine"]["memory_mb"] > 0
    assert cfg["data"]["partition"]["kind"] == "natural" and "alpha" in cfg["data"]
    rows = read_metrics(path)
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"round", "train_loss", "test_loss", "test_accuracy", "bytes_up", "bytes_down",
                "wall_s"} <= set(r)
    assert rows[0]["bytes_up"] < rows[1]["bytes_up"] < rows[2]["bytes_up"]  # cumulative
    summary = json.load(open(os.path.join(path, "summary.json")))
    assert summary["final"]["round"] == 3 and summary["status"] == "ok"
    assert summary["final"]["test_accuracy"] == rows[-1]["test_accuracy"]
    for k in ("bytes_up", "bytes_down", "wall_s", "seed", "strategy", "engine"):
        assert k in summary


def test_rerun_metrics_identical_apart_from_wall_clock(scenario_file, tmp_path, capsys):
    sc = scenario_file()
    a, b = _run(sc, tmp_path, capsys), _run(sc, tmp_path, capsys)
    assert a != b
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(a)) == strip(read_metrics(b))
    # and the rest of each line is byte-identical
    la = [json.dumps({k: v for k, v in r.items() if k != "wall_s"}) for r in read_metrics(a)]
    lb = [json.dumps({k: v for k, v in r.items() if k != "wall_s"}) for r in read_metrics(b)]
    assert la == lb


def test_set_override_changes_the_run(scenario_file, tmp_path, capsys):
    sc = scenario_file()
    base = _run(sc, tmp_path, capsys)
    other = _run(sc, tmp_path, capsys, "--set", "strategy.lr=0.01", "--set", "rounds=2")
    assert len(read_metrics(other)) == 2
    cfg = yaml.safe_load(open(os.path.join(other, "config.yaml")))
    assert cfg["strategy"]["lr"] == 0.01
    assert read_metrics(base)[1]["test_loss"] != read_metrics(other)[1]["test_loss"]


def test_list_commands(capsys):
    for what, expected in [("strategies", "fedavg"), ("datasets", "digits"), ("models", "mlp"),
                           ("participation", "bernoulli"), ("topologies", "ring"),
                           ("partitions", "dirichlet"), ("engines", "multiplex")]:
        code, out, _ = run_cli(["list", what], capsys)
        assert code == 0 and expected in out, (what, out)
        assert all(len(line.split(None, 1)) == 2 for line in out.strip().splitlines()), out


def test_topology_command(capsys):
    code, out, _ = run_cli(["topology", "ring", "--nodes", "8"], capsys)
    assert code == 0
    info = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert info["nodes"] == "8" and info["edges"] == "8" and info["connected"] == "True"
    assert abs(float(info["spectral_gap"]) - 0.195262) < 1e-6


def test_topology_command_bad_param(capsys):
    code, _, err = run_cli(["topology", "random_regular", "--nodes", "8", "degree=9"], capsys)
    assert code == 2 and "degree" in err


def test_plot_and_compare(scenario_file, tmp_path, capsys):
    a = _run(scenario_file(), tmp_path, capsys)
    b = _run(scenario_file(), tmp_path, capsys, "--set", "strategy.lr=0.02")
    png = tmp_path / "fig.png"
    code, out, _ = run_cli(["plot", a, b, "--x", "bytes", "--y", "test_loss", "-o", str(png)], capsys)
    assert code == 0 and png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    code, out, _ = run_cli(["compare", a, b], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 3 and lines[0].split()[0] == "run"
    code, _, err = run_cli(["compare", str(tmp_path)], capsys)
    assert code == 2 and "not a run folder" in err


def test_python_dash_m_and_lazy_imports(scenario_file, tmp_path):
    """`python -m fedsim run` works and never imports flwr, ray or mpi4py on the default engine."""
    code = (f"import runpy, sys; sys.argv = ['fedsim', 'run', {scenario_file()!r}, '--quiet', '--out', "
            f"{str(tmp_path / 'runs')!r}];\n"
            "try:\n    runpy.run_module('fedsim', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "bad = [m for m in ('flwr', 'ray', 'mpi4py') if m in sys.modules]\n"
            "assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "tiny-" in res.stdout


def test_a_crash_leaves_a_partial_folder_marked_failed_and_exits_1(tmp_path, capsys):
    """README contract: the run folder keeps its `.partial` name, summary.json says failed with
    the error, the metrics written so far stay whole lines, and the exit code is 1."""
    from tests.conftest import small_scenario, write_scenario

    # Prepare: a user strategy that raises in round 2 (of 5) on the last client's block
    body = small_scenario(rounds=5, participation={"kind": "full"})
    body["strategy"] = {"name": "tests.mpi_scripts.boom:factory", "batch_size": 8}
    path = write_scenario(tmp_path, body)
    # Execute
    code, out, err = run_cli(["run", path, "--out", str(tmp_path / "runs"), "--quiet"], capsys)
    # Assert
    assert code == 1 and "boom: last client, round 2" in err and "Traceback" not in err
    (folder,) = os.listdir(tmp_path / "runs")
    assert folder.endswith(".partial")
    run_dir = tmp_path / "runs" / folder
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "RuntimeError: boom" in summary["error"]
    assert [m["round"] for m in read_metrics(str(run_dir))] == [1, 2]
