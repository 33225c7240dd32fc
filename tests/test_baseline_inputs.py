"""Bad input to the baselines (issue 15): exit 2 with the key, the value and what is allowed; nothing
written. Krum's f is checked at set-up where the participation pattern fixes the number of
participants (full, uniform), else in the round that has too few (exit 1, a clear message)."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli, small_scenario, write_scenario
from tests.test_cli_errors import _bad

FULL = {"kind": "full"}
CASES = [
    ("fedprox mu < 0", {"strategy": {"name": "fedprox", "mu": -0.1}},
     ["strategy.mu", "-0.1", "greater than or equal to 0"]),
    ("trimmed fraction 0.5",
     {"strategy": {"name": "fedavg", "aggregator": {"name": "trimmed-mean", "beta": 0.5}}},
     ["strategy.aggregator.beta", "0.5", "less than 0.5"]),
    ("krum f too large for full participation",
     {"participation": FULL, "strategy": {"name": "fedavg", "aggregator": {"name": "krum", "f": 3}}},
     ["strategy.aggregator.f", "3", "needs at least 2f + 3 = 9", "got 8", "f <= 2"]),
    ("krum f too large for uniform participation",
     {"strategy": {"name": "fedavg", "aggregator": {"name": "multi-krum", "f": 1}}},
     ["strategy.aggregator.f", "needs at least 2f + 3 = 5", "got 4", "f <= 0"]),
    ("multi-krum selects too many", {"participation": FULL, "strategy": {
        "name": "fedavg", "aggregator": {"name": "multi-krum", "f": 1, "select": 8}}},
     ["strategy.aggregator.select", "at most M - f = 7"]),
    ("dp noise without clipping", {"strategy": {"name": "dp-fedavg", "clip": None, "noise_multiplier": 1.0}},
     ["strategy.noise_multiplier", "needs clipping"]),
    ("dp adaptive clip without a start", {"strategy": {"name": "dp-fedavg", "clip": None, "adaptive": True}},
     ["strategy.adaptive", "initial clip"]),
    ("dp count noise too small", {"strategy": {"name": "dp-fedavg", "noise_multiplier": 2.0, "adaptive": True,
                                               "clip_count_stddev": 0.5}},
     ["strategy.clip_count_stddev", "must exceed noise_multiplier / 2 = 1"]),
    ("unknown aggregator", {"strategy": {"name": "fedavg", "aggregator": {"name": "geomedian"}}},
     ["strategy.aggregator.name", "geomedian", "krum", "median", "trimmed-mean"]),
    ("aggregator on gossip", {"topology": {"kind": "ring"}, "participation": FULL,
                              "strategy": {"name": "gossip", "aggregator": {"name": "median"}}},
     ["strategy.aggregator", "gossip"]),
    ("byzantine fraction 1", {"attack": {"kind": "sign_flip", "fraction": 1.0}},
     ["attack.fraction", "less than 1"]),
    ("unknown attack", {"attack": {"kind": "label_flip"}}, ["attack.kind", "label_flip", "sign_flip"]),
    ("attack on gossip", {"topology": {"kind": "ring"}, "participation": FULL, "strategy": {"name": "gossip"},
                          "attack": {"kind": "scale"}}, ["attack.kind", "gossip"]),
    ("fednova negative momentum", {"strategy": {"name": "fednova", "rho": -0.5}}, ["strategy.rho", "-0.5"]),
    ("fedadam beta2 = 1", {"strategy": {"name": "fedadam", "beta2": 1.0}}, ["strategy.beta2", "less than 1"]),
    ("feddyn alpha 0", {"strategy": {"name": "feddyn", "alpha": 0}}, ["strategy.alpha", "greater than 0"]),
]


@pytest.mark.parametrize("label,over,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_baseline_input_exits_2_with_what_is_allowed(tmp_path, capsys, label, over, needles):
    err = _bad(tmp_path, capsys, small_scenario(**over))
    assert "bad.yaml" in err
    for needle in needles:
        assert needle in err, (needle, err)


def test_krum_with_random_participation_fails_in_the_round_with_too_few(tmp_path, capsys):
    # Prepare: Bernoulli(0.5) of 8 clients with f = 1 (needs 5): some round has fewer
    body = small_scenario(rounds=6, participation={"kind": "bernoulli", "p": 0.5},
                          strategy={"name": "fedavg", "aggregator": {"name": "krum", "f": 1}})
    path = write_scenario(tmp_path, body)
    # Execute
    code, _, err = run_cli(["run", path, "--out", str(tmp_path / "runs"), "--quiet"], capsys)
    # Assert: a runtime failure naming the round and the bound, no traceback
    assert code == 1, err
    assert "aggregator.f: Krum with f = 1 needs at least 2f + 3 = 5 participants per round" in err, err
    assert "round " in err and "Traceback" not in err


def test_default_count_noise_too_small_names_the_default_and_the_fix(tmp_path, capsys):
    # Prepare: 8 clients, 4 per round: the default sigma_b = 0.05 * 4 = 0.2 < z / 2 = 1
    body = small_scenario(strategy={"name": "dp-fedavg", "noise_multiplier": 2.0, "adaptive": True})
    # Execute
    err = _bad(tmp_path, capsys, body)
    # Assert
    for needle in ("strategy.clip_count_stddev", "must exceed noise_multiplier / 2 = 1", "got 0.2",
                   "the default 0.05 m with m = 4 expected participants", "set clip_count_stddev"):
        assert needle in err, (needle, err)
