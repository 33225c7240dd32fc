"""The README's main job: the quickstart scenario end to end, with the accuracy it promises."""

from __future__ import annotations

import json
import os

from tests.conftest import ROOT, run_cli


def test_quickstart_reaches_90_percent(tmp_path, capsys):
    code, out, err = run_cli(["run", str(ROOT / "scenarios" / "quickstart.yaml"), "--quiet",
                              "--out", str(tmp_path)], capsys)
    assert code == 0, err
    summary = json.load(open(os.path.join(out.strip(), "summary.json")))
    assert summary["final"]["round"] == 40
    assert summary["final"]["test_accuracy"] >= 0.90, summary["final"]
    assert summary["clients"] >= 20 and summary["strategy"] == "fedavg"


def test_every_shipped_scenario_validates(capsys):
    """Every scenario file in scenarios/ and benchmarks/scenarios/ is valid as shipped."""
    files = sorted([*ROOT.glob("scenarios/**/*.yaml"), *ROOT.glob("benchmarks/scenarios/*.yaml")])
    assert len(files) > 1
    for f in files:
        code, _, err = run_cli(["validate", str(f)], capsys)
        assert code == 0, (f, err)
