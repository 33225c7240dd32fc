"""The simulated system and its clock: hand-computed round times, the overlap rule, stragglers
(dropout, over-selection, deadlines), FLOPs per sample, determinism and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim import testing
from fedsim.config import parse_scenario
from fedsim.config_system import SystemCfg
from fedsim.errors import ConfigError
from fedsim.setup import build_setup
from fedsim.system import SystemModel, flops_per_sample
from fedsim.work import WORK
from tests.conftest import small_scenario

TWO = {"speed": [1.0, 4.0], "speed_unit": "samples",
       "uplink": {"bandwidth": [128.0, 64.0], "latency": [0.1, 0.2]},
       "downlink": {"bandwidth": 256.0, "latency": 0.0}, "server_time": 0.25}


def _system(cfg: dict, n: int = 2, seed: int = 0) -> SystemModel:
    return SystemModel(SystemCfg(**cfg), n, seed, flops_per_sample=0.0)


def _times(strategy, problem, rounds, system, **kw):
    clock = []
    testing.run(strategy, problem, rounds, eval_every=1, on_eval=lambda m: clock.append(m["sim_time_s"]),
                **kw, system=system)
    return clock


def test_two_clients_by_hand():
    """FedAvg, K = 2 exact-gradient steps (one 'sample' each), P = 2 float64 (16 bytes each way):
    client 0: down 128/256 = 0.5 s + compute 2/1 s + up 0.1 + 128/128 s = 3.6 s;
    client 1: 0.5 + 2/4 + 0.2 + 128/64 = 3.2 s; a round = max + server 0.25 = 3.85 s."""
    problem = testing.QuadraticProblem([[1.0, 2.0], [3.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]])
    clock = _times(testing.build("fedavg", {"lr": 0.1, "local_steps": 2}, problem), problem, 3,
                   _system(TWO))
    assert clock == pytest.approx([3.85, 7.7, 11.55], rel=1e-12)


def test_compressed_uplinks_are_faster_in_seconds():
    """EF21 top-1 of P = 2 sends 1 value + a 1-bit index (9 bytes) after a dense first round."""
    problem = testing.QuadraticProblem([[1.0, 2.0], [3.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]])
    cfg = {**TWO, "uplink": {"bandwidth": 72.0, "latency": 0.0}}
    dense = _times(testing.build("gd", {"lr": 0.1}, problem), problem, 2, _system(cfg))
    sparse = _times(testing.build("ef21", {"lr": 0.1, "compressor": {"name": "top_k", "k": 1}}, problem),
                    problem, 2, _system(cfg))
    # one full-gradient "sample" per round: compute 1 s (client 0 is the slower); up 16*8/72 s dense
    assert dense == pytest.approx([0.5 + 1 + 16 * 8 / 72 + 0.25, 2 * (0.5 + 1 + 16 * 8 / 72 + 0.25)])
    assert sparse[1] - sparse[0] == pytest.approx(0.5 + 1 + 9 * 8 / 72 + 0.25)


def test_one_step_stale_all_reduce_overlaps_the_next_rounds_compute():
    """network allreduce, k = 4 workers: a round of SlowMo costs compute + all-reduce; CO2's
    (staleness 1) costs max(compute, previous all-reduce)."""
    problem = testing.heterogeneous_quadratic(num_clients=4, dim=3, seed=0)
    cfg = {"speed": 2.0, "speed_unit": "samples", "network": "allreduce",
           "collective": {"bandwidth": 8.0, "latency": 0.5}}
    system = _system(cfg, n=4)
    allreduce = system.allreduce_seconds(3 * 8, 4)  # 24 bytes per worker
    assert allreduce == pytest.approx(2 * 3 / 4 * 24 * 8 / 8 + 2 * 3 * 0.5)
    tau = 3
    compute = tau / 2.0
    slowmo = _times(testing.build("slowmo", {"tau": tau}, problem), problem, 3, system)
    co2 = _times(testing.build("co2", {"tau": tau}, problem), problem, 3, system)
    assert slowmo == pytest.approx([(compute + allreduce) * r for r in (1, 2, 3)])
    step = max(compute, allreduce)
    assert co2 == pytest.approx([compute, compute + step, compute + 2 * step])


def test_deadline_drop_keeps_only_the_clients_that_finish_in_time():
    problem = testing.heterogeneous_quadratic(num_clients=4, dim=2, seed=1)
    speeds = [10.0, 1.0, 10.0, 1.0]  # 10 local steps: 1 s or 10 s of compute
    cfg = {"speed": speeds, "speed_unit": "samples", "uplink": {"bandwidth": 1e9, "latency": 0.0},
           "downlink": {"bandwidth": 1e9, "latency": 0.0}, "deadline": {"seconds": 5.0}}
    strat = testing.build("fedavg", {"lr": 0.05, "local_steps": 10}, problem)
    dropped = testing.run(strat, problem, 3, system=_system(cfg, n=4))
    fast = testing.run(strat, problem, 3, participation=testing.MaskParticipation([[1, 0, 1, 0]]))
    torch.testing.assert_close(dropped.state.server["x"], fast.state.server["x"], rtol=0, atol=0)
    assert dropped.state.bytes.per_round == fast.state.bytes.per_round


def test_deadline_partial_caps_local_steps_to_what_fits():
    """Speeds 10 and 1 step/s, deadline 5.5 s, (almost) no communication time: caps 10 (of 10)
    and 5."""
    problem = testing.heterogeneous_quadratic(num_clients=2, dim=2, seed=1)
    cfg = {"speed": [10.0, 1.0], "speed_unit": "samples", "uplink": {"bandwidth": 1e12, "latency": 0.0},
           "downlink": {"bandwidth": 1e12, "latency": 0.0},
           "deadline": {"seconds": 5.5, "policy": "partial"}}
    strat = testing.build("fedavg", {"lr": 0.05, "local_steps": 10}, problem)
    capped = testing.run(strat, problem, 3, system=_system(cfg))
    work = WORK.build("steps", {"steps": [10, 5]}, num_clients=2, seed=0, sizes=problem.sizes,
                      batch_size=None)
    same = testing.run(strat, problem, 3, work=work)
    torch.testing.assert_close(capped.state.server["x"], same.state.server["x"], rtol=0, atol=0)


def test_over_selection_keeps_the_fastest_and_dropout_is_keyed():
    system = _system({"speed": [1.0, 5.0, 2.0, 4.0, 3.0, 6.0], "speed_unit": "samples",
                      "over_selection": 2.0}, n=6)
    plan = system.plan(0, np.ones(6, bool), np.ones(6), np.ones(6), 0.0, 0.0)
    assert plan.mask.tolist() == [False, True, False, True, False, True]
    flaky = _system({"dropout": 0.3}, n=2000, seed=5)
    a = flaky.plan(3, np.ones(2000, bool), np.ones(2000), np.ones(2000), 0.0, 0.0).mask
    b = flaky.plan(3, np.ones(2000, bool), np.ones(2000), np.ones(2000), 0.0, 0.0).mask
    c = flaky.plan(4, np.ones(2000, bool), np.ones(2000), np.ones(2000), 0.0, 0.0).mask
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert abs(1 - a.mean() - 0.3) < 0.04


def test_lognormal_speeds_are_keyed_per_client_and_jitter_per_round():
    cfg = {"speed": {"kind": "lognormal", "median": 1e9, "sigma": 1.0}, "jitter": 0.2}
    s1, s2 = _system(cfg, n=500, seed=3), _system(cfg, n=500, seed=3)
    assert np.array_equal(s1.speed, s2.speed)
    assert abs(np.log(np.median(s1.speed)) - np.log(1e9)) < 0.2 and 0.8 < np.log(s1.speed).std() < 1.2
    ids = np.arange(10)
    assert np.array_equal(s1.speeds(7, ids), s2.speeds(7, ids))
    assert not np.array_equal(s1.speeds(7, ids), s1.speeds(8, ids))


def test_flops_per_sample_of_logistic_regression_is_4dC():
    """One linear layer: forward 2 d C per sample, the weight gradient 2 d C (no input gradient)."""
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    assert flops_per_sample(module, torch.randn(32, 64), torch.randint(0, 10, (32,))) == 4 * 64 * 10


def test_metrics_and_summary_carry_simulated_seconds(tmp_path, capsys):
    import json

    from tests.conftest import read_metrics, run_cli, write_scenario

    path = write_scenario(tmp_path, small_scenario(rounds=3))
    code, out, _ = run_cli(["run", path, "--quiet", "--out", str(tmp_path / "runs")], capsys)
    assert code == 0
    run_dir = out.strip().splitlines()[-1]
    rows = read_metrics(run_dir)
    times = [r["sim_time_s"] for r in rows]
    assert times == sorted(times) and times[0] > 0
    summary = json.loads(open(f"{run_dir}/summary.json").read())
    assert summary["sim_time_s"] == times[-1] == pytest.approx(summary["sim"]["time_s"])
    parts = summary["sim"]
    assert parts["compute_s"] + parts["comm_s"] + parts["server_s"] == pytest.approx(parts["time_s"])


@pytest.mark.parametrize("over,key", [
    ({"system": {"uplink": {"bandwidth": -1.0}}}, "system.uplink.bandwidth"),
    ({"system": {"speed": [1.0, 2.0]}}, "system.speed"),
    ({"system": {"dropout": 1.0}}, "system.dropout"),
    ({"system": {"speed": {"kind": "uniform", "low": 5.0, "high": 1.0}}}, "system.speed"),
    ({"system": {"deadline": {"seconds": 1e-9}}}, "system.deadline.seconds"),
    ({"system": {"over_selection": 2.0}, "strategy": {"name": "gossip"}, "topology": {"kind": "ring"},
      "participation": {"kind": "full"}}, "system.over_selection"),
])
def test_bad_system_settings_name_the_key(over, key):
    with pytest.raises(ConfigError) as err:
        build_setup(parse_scenario(small_scenario(**over)))
    assert (err.value.key or "").startswith(key), str(err.value)


def test_allreduce_cost_grows_with_workers_and_tree_is_logarithmic():
    ring = _system({"network": "allreduce", "collective": {"bandwidth": 1e9, "latency": 0.0}})
    tree = _system({"network": "allreduce", "collective": {"bandwidth": 1e9, "latency": 0.0,
                                                             "algorithm": "tree"}})
    b = 4e6
    assert ring.allreduce_seconds(b, 1) == 0.0
    assert ring.allreduce_seconds(b, 8) == pytest.approx(2 * 7 / 8 * 8 * b / 1e9)
    assert tree.allreduce_seconds(b, 8) == pytest.approx(2 * math.log2(8) * 8 * b / 1e9)
