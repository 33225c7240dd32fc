"""fedsim compare: groups across seeds, mean ± std and t-intervals, rounds to a target, paired
differences, Markdown and CSV, sweep folders, the per-run table, bad input.

Run folders are written in the real format (config.yaml from a resolved scenario, metrics.jsonl,
summary.json) with hand-chosen metrics, and read through the real loader."""

from __future__ import annotations

import csv
import io
import json
import math
import os

import pytest
import yaml

from fedsim.compare import pairs
from fedsim.config import parse_scenario, to_dict
from fedsim.stats import estimate, expand, group_runs
from tests.conftest import run_cli, small_scenario, write_scenario

T2 = 4.302652729911275   # t_{0.975, 2}
T1 = 12.706204736174707  # t_{0.975, 1}


def make_run(root, folder, seed, accs, strategy="fedau", lr=0.1, name="exp", sparams=None,
             first_round=1, **cfg):
    """A run folder: config of small_scenario with these settings; one metrics row per acc
    (rounds from `first_round`; bytes 100 per round each way, host seconds 0.1 per round)."""
    body = small_scenario(seed=seed, name=name, strategy={
        "name": strategy, "lr": lr, "local_steps": 3, "batch_size": 8, **(sparams or {})}, **cfg)
    path = os.path.join(root, folder)
    os.makedirs(path)
    with open(os.path.join(path, "config.yaml"), "w") as fh:
        yaml.safe_dump(to_dict(parse_scenario(body)), fh, sort_keys=False)
    rows = [{"round": t, "train_loss": 1 - a, "test_loss": 2 * (1 - a), "test_accuracy": a,
             "bytes_up": 100 * t, "bytes_down": 100 * t, "wall_s": 0.1 * t}
            for t, a in enumerate(accs, start=first_round)]
    with open(os.path.join(path, "metrics.jsonl"), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(path, "summary.json"), "w") as fh:
        json.dump({"name": name, "status": "ok", "strategy": strategy, "seed": seed,
                   "wall_s": 1.0}, fh)
    return path


def _csv(text):
    return list(csv.DictReader(io.StringIO(text)))


def _row(rows, kind, group, metric):
    (r,) = [r for r in rows if r["kind"] == kind and r["group"] == group and r["metric"] == metric]
    return r


@pytest.fixture
def two_strategies(tmp_path):
    """fedau and fedavg on seeds 0-2; final accuracies [.90, .92, .95] and [.88, .91, .92]."""
    paths = []
    for s, (a, b) in enumerate([(0.90, 0.88), (0.92, 0.91), (0.95, 0.92)]):
        paths.append(make_run(tmp_path, f"fedau-{s}", s, [0.5, a], "fedau", name="fedau"))
        paths.append(make_run(tmp_path, f"fedavg-{s}", s, [0.5, b], "fedavg", name="fedavg"))
    return paths


def test_mean_std_interval_and_paired_difference_by_hand(two_strategies, capsys):
    code, out, _ = run_cli(["compare", *two_strategies, "--format", "csv"], capsys)
    assert code == 0
    rows = _csv(out)
    a = _row(rows, "group", "fedau", "final test_accuracy")
    # mean .923333; deviations -.023333, -.003333, .026667 -> s^2 = .00126667 / 2
    std = math.sqrt(0.0012666666666666666 / 2)
    half = T2 * std / math.sqrt(3)
    assert (a["n"], a["runs"]) == ("3", "3")
    assert float(a["mean"]) == pytest.approx(0.9233333333, abs=1e-9)
    assert float(a["std"]) == pytest.approx(std, abs=1e-12) == pytest.approx(0.0251661148, abs=1e-9)
    assert float(a["ci_low"]) == pytest.approx(0.9233333333 - half, abs=1e-9)
    assert float(a["ci_high"]) == pytest.approx(0.9233333333 + half, abs=1e-9)
    # per-seed differences [.02, .01, .03]: mean .02, std .01, half-width t * .01 / sqrt 3
    d = _row(rows, "paired", "fedavg", "final test_accuracy")
    assert d["baseline"] == "fedau" and d["n"] == "3"
    assert float(d["mean"]) == pytest.approx(-0.02, abs=1e-12)
    assert float(d["std"]) == pytest.approx(0.01, abs=1e-12)
    assert float(d["ci_high"]) == pytest.approx(-0.02 + T2 * 0.01 / math.sqrt(3), abs=1e-12)
    # the paired interval is much tighter than either group's own
    assert float(d["ci_high"]) - float(d["ci_low"]) < 0.5 * (float(a["ci_high"]) - float(a["ci_low"]))
    best = _row(rows, "group", "fedavg", "best test_accuracy")
    assert float(best["mean"]) == pytest.approx((0.88 + 0.91 + 0.92) / 3, abs=1e-12)
    loss = _row(rows, "paired", "fedavg", "final test_loss")  # 2 (1 - acc): differences x -2
    assert float(loss["mean"]) == pytest.approx(0.04, abs=1e-12)


def test_markdown_tables(two_strategies, capsys):
    code, out, _ = run_cli(["compare", *two_strategies, "--baseline", "fedavg"], capsys)
    assert code == 0
    lines = out.splitlines()
    (fedau,) = [ln for ln in lines if ln.startswith("| fedau | 3 (0, 1, 2) |")]
    assert "0.9233 ± 0.0252 [0.8608, 0.9858]" in fedau
    (diff,) = [ln for ln in lines if ln.startswith("| all | fedau | fedavg | 3 |")]
    assert "+0.0200 ± 0.0100 [-0.0048, +0.0448]" in diff and "-0.0400 ± 0.0200" in diff
    assert lines[2].startswith("| group | seeds | final test_accuracy | best test_accuracy |")


def test_rounds_to_target_and_mean_of_the_last_evaluations(tmp_path, capsys):
    paths = [make_run(tmp_path, "s0", 0, [0.5, 0.7, 0.85, 0.9]),
             make_run(tmp_path, "s1", 1, [0.6, 0.81, 0.82, 0.84]),
             make_run(tmp_path, "s2", 2, [0.5, 0.6, 0.7, 0.75])]
    code, out, _ = run_cli(["compare", *paths, "--target", "0.8", "--last", "2",
                            "--format", "csv"], capsys)
    assert code == 0
    rows = _csv(out)
    r = _row(rows, "group", "exp", "rounds to test_accuracy >= 0.8")
    assert (r["n"], r["runs"]) == ("2", "3")  # seed 2 never gets there
    assert float(r["mean"]) == 2.5 and float(r["std"]) == pytest.approx(math.sqrt(0.5))
    assert float(r["ci_high"]) == pytest.approx(2.5 + T1 * math.sqrt(0.5) / math.sqrt(2))
    f = _row(rows, "group", "exp", "final (mean of last 2) test_accuracy")
    assert float(f["mean"]) == pytest.approx((0.875 + 0.83 + 0.725) / 3)
    code, out, _ = run_cli(["compare", *paths, "--target", "0.8"], capsys)
    assert "2.5 ± 0.7 [-3.9, 8.9] (2/3)" in out
    code, out, _ = run_cli(["compare", paths[2], "--target", "0.8"], capsys)
    assert "not reached (0/1)" in out


def test_grouping_labels_contexts_and_baselines(tmp_path):
    paths = []
    for bs in (2048, 1024):  # a non-strategy setting: two contexts
        for strat, lr in (("fedavg", 0.05), ("fedavg", 0.1), ("fedau", 0.05), ("fedau", 0.1)):
            for s in (0, 1):
                paths.append(make_run(tmp_path, f"{bs}-{strat}-{lr}-{s}", s, [0.5, 0.6 + lr],
                                      strat, lr, eval={"every": 1, "batch_size": bs},
                                      output={"dir": f"out{s}"}))  # output never splits groups
    groups = group_runs(expand(paths))
    assert len(groups) == 8 and all(g.seeds == [0, 1] for g in groups)
    assert [g.label for g in groups[:4]] == [
        "strategy=fedavg,lr=0.05,batch_size=2048", "strategy=fedavg,lr=0.1,batch_size=2048",
        "strategy=fedau,lr=0.05,batch_size=2048", "strategy=fedau,lr=0.1,batch_size=2048"]
    prs = pairs(groups, "fedavg")
    assert len(prs) == 4
    for ctx, g, b in prs:  # fedau paired with fedavg at the same lr, in its own context
        assert g.config["strategy.lr"] == b.config["strategy.lr"]
        assert g.config["eval.batch_size"] == b.config["eval.batch_size"]
        assert ctx == f"batch_size={g.config['eval.batch_size']}"
    assert pairs(groups, "strategy=fedau,lr=0.1,batch_size=1024")[0][2].label == \
        "strategy=fedau,lr=0.1,batch_size=1024"


def test_repeated_seed_counts_once(tmp_path, capsys):
    paths = [make_run(tmp_path, "a", 0, [0.8]), make_run(tmp_path, "b", 0, [0.2]),
             make_run(tmp_path, "c", 1, [0.9])]
    (g,) = group_runs(expand(paths))
    assert [r.path for r in g.runs] == [paths[0], paths[2]]
    assert "repeats seed 0" in capsys.readouterr().err
    assert estimate([0.8, 0.9]).mean == pytest.approx(0.85)


def test_compare_a_sweep_folder(tmp_path, capsys):
    sc = write_scenario(tmp_path, small_scenario())
    code, _, _ = run_cli(["sweep", sc, "--out", str(tmp_path / "sw"), "--quiet",
                          "--grid", "strategy.name=fedavg,fedau", "--seeds", "0-1"], capsys)
    assert code == 0
    (tmp_path / "sw" / "not-a-point").mkdir()  # other folders in a sweep folder are ignored
    code, out, _ = run_cli(["compare", str(tmp_path / "sw"), "-o", str(tmp_path / "t.csv")],
                           capsys)
    assert code == 0 and out.strip() == str(tmp_path / "t.csv")
    rows = _csv((tmp_path / "t.csv").read_text())
    g = _row(rows, "group", "strategy=fedau", "final test_accuracy")
    accs = [json.loads((tmp_path / "sw" / f"strategy=fedau,seed={s}" / "metrics.jsonl")
                       .read_text().splitlines()[-1])["test_accuracy"] for s in (0, 1)]
    assert float(g["mean"]) == pytest.approx(sum(accs) / 2, abs=1e-12)
    d = _row(rows, "paired", "strategy=fedau", "final test_accuracy")
    assert d["baseline"] == "strategy=fedavg" and d["n"] == "2"


def test_plain_runs_keep_the_per_run_table(tmp_path, capsys):
    paths = [make_run(tmp_path, "a", 0, [0.5, 0.7], lr=0.1), make_run(tmp_path, "b", 0, [0.6], lr=0.2)]
    code, out, _ = run_cli(["compare", *paths], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 3 and lines[0].split()[:3] == ["run", "strategy", "rounds"]
    assert lines[1].split()[:3] == ["exp", "fedau", "2"] and "0.7000" in lines[1]


@pytest.mark.parametrize("make,args,expect", [
    (lambda t: [str(t)], [], "not a run folder (no metrics.jsonl) nor a sweep folder"),
    (lambda t: [str(t / "missing")], [], "not a run folder"),
    (lambda t: [make_run(t, "a", 0, [0.5])], ["--last", "0"], "--last: must be >= 1"),
    (lambda t: [make_run(t, "a", 0, [0.5]), make_run(t, "b", 0, [0.5], "fedavg")],
     ["--baseline", "scaffold"], "--baseline: no group matches"),
])
def test_bad_compare_input_exits_2(tmp_path, capsys, make, args, expect):
    code, _, err = run_cli(["compare", *make(tmp_path), *args], capsys)
    assert code == 2 and expect in err and "Traceback" not in err


def test_a_sweep_without_finished_points_is_no_input(tmp_path, capsys):
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps({"points": [
        {"id": "seed=0", "status": "failed"}]}))
    code, _, err = run_cli(["compare", str(tmp_path / "sw")], capsys)
    assert code == 2 and "no finished runs" in err



def test_labels_add_plug_in_parameters_only_when_needed(tmp_path):
    def names(specs, name=None):
        ps = [make_run(tmp_path, f"{name}{i}", 0, [0.5], st, name=name or f"n{i}", sparams=sp)
              for i, (st, sp) in enumerate(specs)]
        return [g.label for g in group_runs(expand(ps))]

    assert names([("fedau", {}), ("fedavg", {})]) == ["n0", "n1"]  # names tell them apart
    three = [("fedau", {}), ("fedau", {"cutoff": 50}), ("fedavg", {})]
    assert names(three, "same") == ["strategy=fedau,cutoff=None", "strategy=fedau,cutoff=50",
                                    "strategy=fedavg,weighting=samples"]
    assert names(three[::2], "other") == ["strategy=fedau", "strategy=fedavg"]


def test_labels_drop_the_parts_every_group_shares():
    from fedsim.stats import drop_common

    assert drop_common(["pattern=markov,strategy=fedau", "pattern=markov,strategy=fedavg"]) == \
        ["strategy=fedau", "strategy=fedavg"]
    for keep in (["a=1,b=2", "a=1,b=2,c=3"], ["x"], ["fedau-markov", "fedavg-markov"]):
        assert drop_common(keep) == keep
