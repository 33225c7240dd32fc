"""Provenance in summary.json (versions, host, device, git state) and `fedsim --version`."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
from importlib import metadata

import numpy
import pytest
import torch

from fedsim.provenance import DISTRIBUTION, git_state
from tests.conftest import ROOT, run_cli


def _git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_summary_records_versions_host_device_and_git(scenario_file, tmp_path, capsys):
    code, out, err = run_cli(["run", scenario_file(), "--out", str(tmp_path), "--quiet"], capsys)
    assert code == 0, err
    prov = json.load(open(os.path.join(out.strip(), "summary.json")))["provenance"]
    v = prov["versions"]
    assert v["fedsim"] == metadata.version(DISTRIBUTION) and v["torch"] == torch.__version__
    assert v["numpy"] == numpy.__version__ and v["flwr"] == metadata.version("flwr")
    assert v["python"] == platform.python_version()
    assert prov["host"] == socket.gethostname()
    dev = prov["device"]
    assert dev["requested"] == "cpu" and dev["type"] == "cpu" and dev["name"]
    assert prov["git"]["commit"] == _git(ROOT, "rev-parse", "HEAD")
    assert prov["git"]["dirty"] == bool(_git(ROOT, "status", "--porcelain"))
    assert "scenario_git" not in prov  # the scenario lies outside any git tree


def test_git_state_of_a_tree(tmp_path):
    assert git_state(tmp_path) is None  # not a git tree
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("1")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-qm", "c")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert git_state(tmp_path) == {"commit": head, "dirty": False, "root": str(tmp_path)}
    (tmp_path / "a.txt").write_text("2")
    assert git_state(tmp_path)["dirty"] is True
    _git(tmp_path, "checkout", "-q", "a.txt")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "new.py").write_text("")
    assert git_state(tmp_path / "sub") == {"commit": head, "dirty": True, "root": str(tmp_path)}


def test_a_scenario_in_another_repository_records_its_commit(scenario_file, tmp_path, capsys):
    repo = tmp_path / "exp"
    repo.mkdir()
    _git(repo, "init", "-q")
    sc = scenario_file()
    target = repo / "s.yaml"
    target.write_text(open(sc).read())
    _git(repo, "add", "s.yaml")
    _git(repo, "commit", "-qm", "c")
    code, out, _ = run_cli(["run", str(target), "--out", str(tmp_path / "runs"), "--quiet"], capsys)
    assert code == 0
    prov = json.load(open(os.path.join(out.strip(), "summary.json")))["provenance"]
    assert prov["scenario_git"]["commit"] == _git(repo, "rev-parse", "HEAD")


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(["--version"], capsys)
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == \
        f"fedsim {metadata.version(DISTRIBUTION)} (distribution {DISTRIBUTION})"
