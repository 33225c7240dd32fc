"""Bad data files and bad paths (issue 18): exit 2 with one line naming the data file (not the
scenario), the array or line, the value and what is allowed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli, small_scenario, write_scenario


def one_line(code: int, err: str) -> str:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _npz_scenario(tmp_path: Path, path: Path, clients: int = 4) -> str:
    return write_scenario(tmp_path, small_scenario(data={"dataset": "npz", "path": str(path),
                                                         "clients": clients, "test_fraction": 0.2,
                                                         "partition": {"kind": "iid"}}), "s.yaml")


def _arrays(n: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x_train": rng.normal(size=(n, 3)).astype(np.float32), "y_train": np.arange(n) % 3}


NPZ_CASES = [
    ("length mismatch", {"y_train": np.arange(39) % 3}, ["x_train", "lengths differ"]),
    ("float labels", {"y_train": np.linspace(0, 1, 40)}, ["y_train", "fractional"]),
    ("string labels", {"y_train": np.array(["a"] * 40)}, ["y_train", "integer class ids"]),
    ("negative labels", {"y_train": -(np.arange(40) % 3)}, ["y_train", "non-negative"]),
    ("2-D labels", {"y_train": np.zeros((40, 2), dtype=np.int64)}, ["y_train", "1-D"]),
    ("missing x_train", {"x_train": None}, ["x_train", "missing array"]),
    ("x_test without y_test", {"x_test": np.zeros((5, 3), np.float32)}, ["y_test", "missing array"]),
    ("feature shape mismatch", {"x_test": np.zeros((5, 4), np.float32), "y_test": np.zeros(5, np.int64)},
     ["x_test", "feature shapes differ"]),
    ("inf features", {"x_train": np.full((40, 3), np.inf, np.float32)}, ["x_train", "NaN or infinite"]),
    ("float client ids", {"client_id": np.linspace(0, 1, 40)}, ["client_id", "1-D array of integers"]),
]


@pytest.mark.parametrize("label,change,needles", NPZ_CASES, ids=[c[0] for c in NPZ_CASES])
def test_bad_npz_names_the_file_and_the_array(tmp_path, capsys, label, change, needles):
    arrays = _arrays()
    for k, v in change.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    data = tmp_path / "data.npz"
    np.savez(data, **arrays)
    code, _, err = run_cli(["validate", _npz_scenario(tmp_path, data)], capsys)
    err = one_line(code, err)
    assert f"{data}: " in err, err  # the data file is the culprit, not the scenario
    for needle in needles:
        assert needle in err, (needle, err)


def test_object_array_npz_is_refused_without_unpickling(tmp_path, capsys):
    data = tmp_path / "data.npz"
    arrays = _arrays()
    arrays["y_train"] = np.array([{"label": 1}] * 40, dtype=object)
    np.savez(data, **arrays)
    code, _, err = run_cli(["validate", _npz_scenario(tmp_path, data)], capsys)
    assert str(data) in one_line(code, err)


@pytest.mark.parametrize("cut", [0.5, 0.1])
def test_truncated_or_corrupt_npz(tmp_path, capsys, cut):
    good = tmp_path / "good.npz"
    np.savez(good, **_arrays())
    data = tmp_path / "data.npz"
    raw = good.read_bytes()
    data.write_bytes(raw[: int(len(raw) * cut)] if cut > 0.2 else b"garbage" + raw[100:])
    code, _, err = run_cli(["validate", _npz_scenario(tmp_path, data)], capsys)
    assert str(data) in one_line(code, err) and "corrupt or truncated" in err


def test_more_clients_than_rows(tmp_path, capsys):
    data = tmp_path / "data.npz"
    np.savez(data, **_arrays(10))
    code, _, err = run_cli(["validate", _npz_scenario(tmp_path, data, clients=50)], capsys)
    err = one_line(code, err)
    assert "(got 50)" in err and "data.clients" in err and "at most 8" in err


@pytest.mark.parametrize("text,lineno,needle", [
    ("0 1\n1 2\n# comment\n2 x\n", 4, "bad edge line"),
    ("0 1\n1 99\n", 2, "99"),
    ("0 1\n1\n", 2, "bad edge line"),
])
def test_edge_list_errors_name_the_line(tmp_path, capsys, text, lineno, needle):
    edges = tmp_path / "g.txt"
    edges.write_text(text)
    body = small_scenario(strategy={"name": "gossip", "lr": 0.1}, topology={"kind": "edge_list",
                                                                          "path": str(edges)})
    body["participation"] = {"kind": "full"}
    code, _, err = run_cli(["validate", write_scenario(tmp_path, body)], capsys)
    err = one_line(code, err)
    assert f"{edges}:{lineno}" in err and needle in err


# ---- bad paths: exit 2, not a raw exception ---------------------------------------------------

def test_out_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = write_scenario(tmp_path, small_scenario(rounds=1))
    for out in (blocker, blocker / "below"):
        code, _, err = run_cli(["run", path, "--out", str(out), "--quiet"], capsys)
        assert "--out" in one_line(code, err) and str(blocker) in err
    assert blocker.read_text() == "x"


def test_out_that_is_not_writable(tmp_path, capsys, monkeypatch):
    """A read-only --out (simulated: the tests may run as root, who writes anywhere)."""
    from fedsim import run as run_mod

    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(run_mod.os, "access", lambda path, mode: str(path) != str(ro))
    path = write_scenario(tmp_path, small_scenario(rounds=1))
    code, _, err = run_cli(["run", path, "--out", str(ro), "--quiet"], capsys)
    assert "--out" in one_line(code, err) and "not writable" in err
    assert not os.listdir(ro)


def _a_run(tmp_path: Path, capsys) -> str:
    path = write_scenario(tmp_path, small_scenario(rounds=1))
    code, out, err = run_cli(["run", path, "--out", str(tmp_path / "runs"), "--quiet"], capsys)
    assert code == 0, err
    return out.strip()


@pytest.mark.parametrize("command", ["plot", "compare"])
def test_output_file_in_a_missing_folder_or_a_folder(tmp_path, capsys, command):
    run = _a_run(tmp_path, capsys)
    for target, needle in ((tmp_path / "nope" / "x.png", "does not exist"), (tmp_path, "is a directory")):
        code, _, err = run_cli([command, run, "-o", str(target)], capsys)
        assert "-o" in one_line(code, err) and needle in err
    assert not (tmp_path / "nope").exists()


def test_flower_run_with_a_missing_app_dir(tmp_path, capsys):
    code, _, err = run_cli(["flower-run", "app:server", "app:client", "--nodes", "2",
                            "--app-dir", str(tmp_path / "missing")], capsys)
    assert "--app-dir" in one_line(code, err) and "missing" in err


def test_flower_run_app_module_that_raises(tmp_path, capsys):
    (tmp_path / "brokenapp.py").write_text("raise RuntimeError('app import failed')\n")
    code, _, err = run_cli(["flower-run", "brokenapp:server", "brokenapp:client", "--nodes", "2",
                            "--app-dir", str(tmp_path)], capsys)
    assert "app import failed" in one_line(code, err)


def test_scenario_path_that_is_a_directory(tmp_path, capsys):
    code, _, err = run_cli(["validate", str(tmp_path)], capsys)
    assert "directory" in one_line(code, err)
