"""A real Flower deployment: `flower-superlink` and SuperNodes as processes on 127.0.0.1.

The exported app of a scenario runs under `flwr run APP <connection>` against one SuperLink and
two SuperNodes (`--node-config "partition-id=i num-partitions=2"`), every process started and
stopped here on free ports, with a time limit; its metrics must equal `fedsim run`'s. Flower
1.42 starts one `flwr-clientapp` process per message (each imports torch and builds the
scenario), so the scenario is small and runs one round.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from tests.conftest import read_metrics, run_cli, small_scenario, write_scenario
from tests.flower_apps.support import deployment, same_metrics

pytestmark = [pytest.mark.flower, pytest.mark.slow]
NODES = 2


@pytest.mark.timeout(420)
def test_exported_app_on_a_superlink_with_supernodes_equals_fedsim_run(tmp_path, capsys):
    body = small_scenario(rounds=1, data={"clients": NODES}, participation={"kind": "full"},
                          strategy={"name": "scaffold", "lr": 0.1, "local_steps": 3, "batch_size": 8})
    path = write_scenario(tmp_path, body)
    code, ref_dir, err = run_cli(["run", path, "--quiet", "--out", str(tmp_path / "ref")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["export-flower", path, str(tmp_path / "app")], capsys)
    assert code == 0, err
    out = tmp_path / "deployed"
    with deployment(str(tmp_path / "flwr-home"), NODES) as env:
        res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "flwr"), "run",
                              str(tmp_path / "app"), "deploy", "--stream",
                              "--run-config", f"output-dir='{out}'"],
                             env=env, capture_output=True, text=True, timeout=300)
        logs = "\n".join(open(f, errors="replace").read()[-2000:]
                         for f in env["FEDSIM_DEPLOY_LOGS"].split(os.pathsep))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + logs
    (run_dir,) = glob.glob(os.path.join(out, "*"))
    got, ref = read_metrics(run_dir), read_metrics(ref_dir.strip())
    assert same_metrics(ref, got), (ref, got)
    assert got[-1]["flower_bytes_up"] > got[-1]["bytes_up"] > 0
