"""The README's main job: the quickstart scenario end to end, with the accuracy it promises."""

from __future__ import annotations

import json
import os

import yaml

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
    """Every scenario file in scenarios/ and benchmarks/scenarios/ is valid as shipped.

    Scenarios whose data is downloaded (a Hugging Face hub id, LEAF's output) are run on
    local stand-ins by tests/test_paper_scenarios.py instead: validating loads the data.
    """
    files = sorted([*ROOT.glob("scenarios/**/*.yaml"), *ROOT.glob("benchmarks/scenarios/*.yaml")])
    assert len(files) > 1
    for f in files:
        data = (yaml.safe_load(f.read_text()) or {}).get("data", {})
        if data.get("dataset") in ("hf", "leaf") and not os.path.exists(data.get("path", "")):
            continue
        code, _, err = run_cli(["validate", str(f)], capsys)
        assert code == 0, (f, err)
