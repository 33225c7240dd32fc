"""fedsim plot: mean curve and band per group of seeds (by hand), round-0 points, axis names,
titles, and log axes whose tick labels never overlap."""

from __future__ import annotations

import json
import math
import os
from itertools import pairwise

import pytest

from fedsim.plot import figure, mean_curve
from fedsim.stats import expand, group_runs
from tests.conftest import run_cli
from tests.test_compare import T1, make_run


def _write_rows(path, rows):
    with open(os.path.join(path, "metrics.jsonl"), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def test_mean_curve_and_bands_by_hand(tmp_path):
    a = make_run(tmp_path, "a", 0, [0.5, 0.7])
    b = make_run(tmp_path, "b", 1, [0.7, 0.9, 0.95])  # round 3: only one seed has it
    (g,) = group_runs(expand([a, b]))
    xs, mean, lo, hi = mean_curve(g, "round", "test_accuracy", "std")
    assert xs == [1, 2] and mean == pytest.approx([0.6, 0.8])
    std = math.sqrt(0.02)  # (0.1^2 + 0.1^2) / (2 - 1)
    assert lo == pytest.approx([0.6 - std, 0.8 - std]) and hi == pytest.approx([0.6 + std, 0.8 + std])
    _, _, lo, hi = mean_curve(g, "round", "test_accuracy", "ci")
    assert hi[0] - 0.6 == pytest.approx(T1 * std / math.sqrt(2))
    xs, *_ = mean_curve(g, "bytes", "test_accuracy")
    assert xs == [200, 400]  # up + down, mean over seeds
    _write_rows(b, [{"round": 1, "test_accuracy": 0.7, "bytes_up": 300, "bytes_down": 0},
                    {"round": 2, "test_accuracy": 0.9, "bytes_up": 600, "bytes_down": 0}])
    xs, *_ = mean_curve(group_runs(expand([a, b]))[0], "bytes_up", "test_accuracy")
    assert xs == [200, 400]  # (100 + 300) / 2, (200 + 600) / 2


def test_figure_bands_labels_title_and_round_zero(tmp_path):
    runs = [make_run(tmp_path, f"au{s}", s, [0.1, 0.5, 0.7], "fedau", name="fedau", first_round=0)
            for s in (0, 1)] + [make_run(tmp_path, "avg", 0, [0.1, 0.4, 0.6], "fedavg",
                                         name="fedavg", first_round=0)]
    fig = figure(group_runs(expand(runs)), "round", "test_accuracy")
    (ax,) = fig.axes
    assert [ln.get_label() for ln in ax.lines] == ["fedau (n=2)", "fedavg"]
    assert list(ax.lines[0].get_xdata()) == [0, 1, 2]  # the round-0 evaluation is the first point
    assert len(ax.collections) == 1  # a band only for the group with several seeds
    assert ax.get_xlabel() == "round" and ax.get_ylabel() == "test accuracy"
    assert ax.get_title() == "test accuracy — synthetic, 8 clients; mean over 2 seeds"
    fig = figure(group_runs(expand(runs)), "wall", "test_loss", band="none", title="T")
    assert fig.axes[0].get_xlabel() == "host seconds" and fig.axes[0].get_title() == "T"
    assert not fig.axes[0].collections
    fig = figure(group_runs(expand(runs)), "bytes", "test_accuracy")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and list(ax.lines[0].get_xdata()) == [200, 400]  # no x = 0
    assert ax.get_xlabel() == "bytes communicated (up + down)"


def _labels(fig, axis):
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    ax = fig.axes[0]
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    ticks = ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks() if axis == "x" else \
        ax.yaxis.get_major_ticks() + ax.yaxis.get_minor_ticks()
    boxes = [t.label1.get_window_extent(r) for t in ticks
             if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi]
    return sorted(boxes, key=lambda b: b.x0 if axis == "x" else b.y0)


@pytest.mark.parametrize("lo,hi", [(2e5, 8e5), (5e2, 3e4), (1e3, 1e9), (3e1, 4e11)])
def test_log_byte_axis_labels_never_overlap(tmp_path, lo, hi):
    path = make_run(tmp_path, "r", 0, [0.1] * 12)
    n = 12
    _write_rows(path, [{"round": t + 1, "test_accuracy": 0.5, "bytes_up": lo * (hi / lo) ** (t / (n - 1)),
                        "bytes_down": 0} for t in range(n)])
    boxes = _labels(figure(group_runs(expand([path])), "bytes_up", "test_accuracy"), "x")
    assert len(boxes) >= 2
    assert all(a.x1 <= b.x0 for a, b in pairwise(boxes)), [(b.x0, b.x1) for b in boxes]


@pytest.mark.parametrize("lo,hi", [(0.2, 0.5), (1e-6, 1.0), (1e-12, 10.0), (0.03, 3.0)])
def test_log_y_axis_labels_never_overlap(tmp_path, lo, hi):
    path = make_run(tmp_path, "r", 0, [0.1] * 12)
    _write_rows(path, [{"round": t + 1, "consensus_distance": lo * (hi / lo) ** (t / 11)}
                       for t in range(12)])
    fig = figure(group_runs(expand([path])), "round", "consensus_distance")  # log y by default
    assert fig.axes[0].get_yscale() == "log"
    boxes = _labels(fig, "y")
    assert len(boxes) >= 2
    assert all(a.y1 <= b.y0 for a, b in pairwise(boxes))


def test_plot_command_draws_a_sweep_folder(tmp_path, capsys):
    sw = tmp_path / "sw"
    sw.mkdir()
    points = []
    for s in (0, 1):
        make_run(sw, f"seed={s}", s, [0.3, 0.6])
        points.append({"id": f"seed={s}", "label": "base", "status": "ok"})
    make_run(sw, "seed=2", 2, [0.9, 0.9])  # not finished according to the index: left out
    points.append({"id": "seed=2", "label": "base", "status": "failed"})
    (sw / "sweep.json").write_text(json.dumps({"points": points}))
    (g,) = group_runs(expand([str(sw)]))
    assert g.seeds == [0, 1] and g.label == "base"
    png = tmp_path / "f.png"
    code, out, err = run_cli(["plot", str(sw), "--band", "ci", "-o", str(png)], capsys)
    assert code == 0 and out.strip() == str(png) and png.read_bytes()[:4] == b"\x89PNG"
    assert "1 of 3 points have not finished" in err
    code, _, err = run_cli(["plot", str(sw), "--x", "sim"], capsys)
    assert code == 2 and "sim" in err
