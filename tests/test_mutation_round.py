"""Tests added by the mutation pass over the round kernel and the simulated system.

Each test kills a single-point mutant of `fedsim/round.py` or `fedsim/system.py` that the rest of
the suite let through; the mutant is named in the test's docstring, and the table of the whole
pass (mutants tried, killed before, test added) is in tests/README.md.
"""

from __future__ import annotations

import pytest
import torch

from fedsim import testing
from fedsim.config_system import SystemCfg
from fedsim.system import SystemModel

TWO = ([[1.0, 2.0], [3.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]])
FAST_LINKS = {"uplink": {"bandwidth": 1e12, "latency": 0.0}, "downlink": {"bandwidth": 1e12, "latency": 0.0}}


def _system(cfg: dict, n: int = 2, seed: int = 0) -> SystemModel:
    return SystemModel(SystemCfg(**cfg), n, seed, flops_per_sample=0.0)


def test_one_gradient_methods_plan_one_pass_against_the_deadline():
    """gd (local_steps None) plans ONE full pass per round: with speed 1 sample/s and one sample
    per client, its 1 s of compute fits a 1.5 s deadline, so nobody is dropped and the run equals
    gd without a system. Kills `strategy.local_steps or 1` -> `or 2` in `planned_work` (R04)."""
    problem = testing.QuadraticProblem([[1.0, 2.0], [3.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]])
    strat = testing.build("gd", {"lr": 0.1}, problem)
    cfg = {"speed": 1.0, "speed_unit": "samples", **FAST_LINKS, "deadline": {"seconds": 1.5}}
    timed = testing.run(strat, problem, 3, system=_system(cfg))
    plain = testing.run(strat, problem, 3)
    torch.testing.assert_close(timed.state.server["x"], plain.state.server["x"], rtol=0, atol=0)
    assert not torch.equal(plain.state.server["x"], torch.zeros(2, dtype=torch.float64))


def test_minibatch_steps_are_planned_at_the_batch_size_not_the_local_data():
    """A local step touches one minibatch: 2 steps of batch 2 at 1 sample/s take 4 s and fit a
    5 s deadline, although each client holds 10 samples (a full pass would take 20 s). Kills
    planning a step at the local data size (`step_samples = sizes`, R05)."""
    problem = testing.QuadraticProblem([[1.0, 2.0], [3.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]], sizes=[10, 10])
    problem.batch_size = 2
    strat = testing.build("fedavg", {"lr": 0.1, "local_steps": 2}, problem)
    cfg = {"speed": 1.0, "speed_unit": "samples", **FAST_LINKS, "deadline": {"seconds": 5.0}}
    timed = testing.run(strat, problem, 2, system=_system(cfg))
    plain = testing.run(strat, problem, 2)
    torch.testing.assert_close(timed.state.server["x"], plain.state.server["x"], rtol=0, atol=0)
    assert not torch.equal(plain.state.server["x"], torch.zeros(2, dtype=torch.float64))


def _times(strategy, problem, rounds, system, **kw):
    clock: list[float] = []
    testing.run(strategy, problem, rounds, eval_every=1, on_eval=lambda m: clock.append(m["sim_time_s"]),
                system=system, **kw)
    return clock


def test_a_client_that_stops_early_is_timed_for_the_steps_it_took():
    """Work budgets [2, 1] steps of 1 sample: the slow client (1 sample/s) computes for 1 s, not
    2, so a round lasts 1 s + 0.5 s server time. Kills `self.steps > step` -> `>=` in
    `CountingOracle` (R15: a stopped row still counted for one more step)."""
    from fedsim.work import WORK

    problem = testing.QuadraticProblem([[1.0, 2.0], [3.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]])
    work = WORK.build("steps", {"steps": [2, 1]}, num_clients=2, seed=0, sizes=problem.sizes, batch_size=None)
    cfg = {"speed": [10.0, 1.0], "speed_unit": "samples", **FAST_LINKS, "server_time": 0.5}
    clock = _times(testing.build("fedavg", {"lr": 0.1, "local_steps": 2}, problem), problem, 2,
                   _system(cfg), work=work)
    assert clock == pytest.approx([1.5, 3.0], rel=1e-9)


def test_derived_payload_keys_are_not_planned_as_upload():
    """The dense planned upload counts the declared payload but its derived keys (a receiver
    computes them): P = 3 float64 values of "delta", not the 2 "aux" values. Kills dropping the
    `derived_keys` filter in `dense_row_bytes` (R14)."""
    from fedsim import round as kernel
    from fedsim.types import Strategy, no_clients

    strat = Strategy(init_server=lambda x0: {"x": x0}, init_clients=no_clients, local=lambda *a: ({}, {}, {}),
                     payload=lambda p: {"delta": (p,), "aux": (2,)}, derived_keys=("aux",))
    server = {"x": torch.zeros(3, dtype=torch.float64)}
    assert kernel.dense_row_bytes(strat, server, 3) == 3 * 8


def test_a_full_gradient_is_timed_at_the_local_data_size():
    """gd's full gradient touches the client's 10 samples, not a minibatch of 2: at 1 sample/s
    a round lasts 10 s (+ 0.5 s server). Kills `CountingOracle.full` counting the batch (R16)."""
    problem = testing.QuadraticProblem([[1.0, 2.0], [3.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]], sizes=[10, 10])
    problem.batch_size = 2
    cfg = {"speed": 1.0, "speed_unit": "samples", **FAST_LINKS, "server_time": 0.5}
    assert _times(testing.build("gd", {"lr": 0.1}, problem), problem, 2, _system(cfg)) == \
        pytest.approx([10.5, 21.0], rel=1e-9)


def test_a_node_without_neighbours_spends_no_time_sending():
    """One gossip node has no neighbour: its round is its compute (1 step of 1 sample at
    2 samples/s = 0.5 s), however slow its edge link. Kills timing the exchange with degree 1
    for every node (`degrees` -> ones in `record_times`, R17)."""
    from topologies import build_topology

    problem = testing.QuadraticProblem([[1.0, 2.0]], [[0.0, 1.0]])
    cfg = {"speed": 2.0, "speed_unit": "samples", "edges": {"bandwidth": 1.0, "latency": 3.0}}
    topo = build_topology("ring", {}, n=1, seed=0)
    strat = testing.build("gossip", {"lr": 0.1}, problem)
    clock = _times(strat, problem, 2, _system(cfg, n=1), topology=topo)
    assert clock == pytest.approx([0.5, 1.0], rel=1e-9)


def test_all_reduce_workers_wait_only_for_the_slowest_compute():
    """network allreduce: the workers' own uplinks are not used (the collective is timed once),
    so idle time is the wait for the slowest compute only: speeds 1 and 2 samples/s, one step of
    one sample -> waits 0 and 0.5 s, mean 0.25 s per participation, whatever the uplink latency.
    Kills recording the star uplink for all-reduce workers (R18)."""
    problem = testing.QuadraticProblem([[1.0, 2.0], [3.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]])
    cfg = {"speed": [1.0, 2.0], "speed_unit": "samples", "network": "allreduce",
           "uplink": {"bandwidth": 1e12, "latency": 0.2}, "collective": {"bandwidth": 1e12, "latency": 0.0}}
    loop = testing.run(testing.build("slowmo", {"tau": 1}, problem), problem, 3, system=_system(cfg))
    assert loop.clock.summary()["idle_client_s_mean"] == pytest.approx(0.25, rel=1e-9)


def test_evaluations_fall_on_every_kth_round_and_the_last():
    """eval_every 2 over 5 rounds evaluates after rounds 2, 4 and 5 (1-based). Kills
    `(t + 1) % every` -> `t % every` in `eval_due` (R25), which evaluates after 1, 3, 5."""
    from fedsim import round as kernel

    problem = testing.QuadraticProblem([[1.0, 2.0], [3.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]])
    seen: list[int] = []
    testing.run(testing.build("gd", {"lr": 0.1}, problem), problem, 5, eval_every=2,
                on_eval=lambda m: seen.append(m["round"]))
    assert seen == [2, 4, 5]
    assert [t for t in range(5) if kernel.eval_due(t, 2, 5)] == [1, 3, 4]


def test_node_metrics_are_means_over_the_nodes():
    """Consensus distance and node accuracy are means over the n nodes: squared distances summing
    to 6 and accuracies summing to 1.5 over 3 nodes give 2 and 0.5. Kills dropping the `/ n` of
    the accuracy (R28)."""
    from fedsim import round as kernel

    assert kernel.node_metrics(6.0, 1.5, 3) == {"consensus_distance": 2.0, "node_accuracy_mean": 0.5}
    assert kernel.node_metrics(6.0, None, 3)["node_accuracy_mean"] is None


def test_train_loss_is_the_mean_over_participations_since_the_last_evaluation():
    """gd, lr 0.1, two equal clients f_0 = 0.5 (x_0^2 + 2 (x_1 - 1)^2), f_1 = 0.5 (3 (x_0 - 1)^2 + x_1^2),
    evaluated every 2 rounds: round 0 at x = 0 has losses 1 and 1.5; the step
    x = 0 - 0.1 (0.5 [0, -2] + 0.5 [-3, 0]) = [0.15, 0.1] gives 0.82125 and 1.08875; the metric is
    their mean 1.1025. Kills `loss_sum / loss_count` -> `loss_sum` in `metrics_line` (R31)."""
    problem = testing.QuadraticProblem([[1.0, 2.0], [3.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]])
    lines: list[dict] = []
    testing.run(testing.build("gd", {"lr": 0.1}, problem), problem, 2, eval_every=2, on_eval=lines.append)
    assert [m["train_loss"] for m in lines] == pytest.approx([(1 + 1.5 + 0.82125 + 1.08875) / 4], rel=1e-12)


# P = 2 float64 values: 16 bytes each way at 128 bit/s is exactly 1 s down and 1 s up.
SLOW_LINKS = {"uplink": {"bandwidth": 128.0, "latency": 0.0},
              "downlink": {"bandwidth": 128.0, "latency": 0.0}}


def test_a_client_finishing_exactly_at_the_deadline_is_kept():
    """Down 1 s + 2 steps at 1 sample/s + up 1 s = 4 s: on a 4 s deadline (policy drop) the client
    finishes in time, so the run equals the run without a system. Kills `total > deadline` ->
    `>=` in `SystemModel.plan` (Y12)."""
    problem = testing.QuadraticProblem(*TWO)
    strat = testing.build("fedavg", {"lr": 0.1, "local_steps": 2}, problem)
    cfg = {"speed": 1.0, "speed_unit": "samples", **SLOW_LINKS, "deadline": {"seconds": 4.0}}
    timed = testing.run(strat, problem, 2, system=_system(cfg))
    plain = testing.run(strat, problem, 2)
    torch.testing.assert_close(timed.state.server["x"], plain.state.server["x"], rtol=0, atol=0)


def test_partial_deadline_leaves_time_for_the_transfers():
    """policy partial: a 5 s deadline minus 1 s down and 1 s up leaves 3 s, i.e. 3 of the 10 local
    steps at 1 step/s, the same as a work budget of 3 steps. Kills computing the cap from the
    whole deadline, `(d.seconds - comm)` -> `d.seconds` (Y13: 5 steps)."""
    from fedsim.work import WORK

    problem = testing.QuadraticProblem(*TWO)
    strat = testing.build("fedavg", {"lr": 0.05, "local_steps": 10}, problem)
    cfg = {"speed": 1.0, "speed_unit": "samples", **SLOW_LINKS,
           "deadline": {"seconds": 5.0, "policy": "partial"}}
    capped = testing.run(strat, problem, 2, system=_system(cfg))
    work = WORK.build("steps", {"steps": [3, 3]}, num_clients=2, seed=0, sizes=problem.sizes, batch_size=None)
    same = testing.run(strat, problem, 2, work=work)
    torch.testing.assert_close(capped.state.server["x"], same.state.server["x"], rtol=0, atol=0)


def test_over_selection_keeps_the_rounded_share():
    """over_selection f keeps round(|S| / f) of the selected clients: 7 selected with f = 2 keep
    the 4 fastest (speeds 1..7: clients 3-6), not floor(3.5) = 3. Kills `round` -> floor
    division in `SystemModel.plan` (Y11)."""
    import numpy as np

    system = _system({"speed": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], "speed_unit": "samples",
                      "over_selection": 2.0}, n=7)
    plan = system.plan(0, np.ones(7, bool), np.ones(7), np.ones(7), 0.0, 0.0)
    assert np.flatnonzero(plan.mask).tolist() == [3, 4, 5, 6]


def test_star_clients_idle_while_waiting_for_the_slowest_upload():
    """test_system's two clients take 3.6 s and 3.2 s (down + compute + up): the faster one waits
    0.4 s a round, a mean of 0.2 s per participation. Kills measuring the wait against the
    slowest compute instead of the slowest total (Y19: clamped to 0)."""
    problem = testing.QuadraticProblem(*TWO)
    cfg = {"speed": [1.0, 4.0], "speed_unit": "samples",
           "uplink": {"bandwidth": [128.0, 64.0], "latency": [0.1, 0.2]},
           "downlink": {"bandwidth": 256.0, "latency": 0.0}, "server_time": 0.25}
    loop = testing.run(testing.build("fedavg", {"lr": 0.1, "local_steps": 2}, problem), problem, 3,
                       system=_system(cfg))
    assert loop.clock.summary()["idle_client_s_mean"] == pytest.approx(0.2, rel=1e-9)


def test_stale_rounds_measure_idle_time_against_the_overlapped_round():
    """CO2 (staleness 1) on a star: client 0 computes 2 s (tau 2 at 1 sample/s) and sends at once,
    client 1 computes 0.5 s and its upload takes 3 s (latency). Round 0 lasts 2 s; later rounds
    last max(2, the previous upload 3) = 3 s, in which they work 2 and 3.5 s: 0.5 s of waiting
    per round (rounds 1 and 2), a mean of 1/6 s over 6 participations. Kills measuring the wait
    against the slowest compute under overlap (Y24: 0)."""
    problem = testing.QuadraticProblem(*TWO)
    cfg = {"speed": [1.0, 4.0], "speed_unit": "samples",
           "uplink": {"bandwidth": 1e12, "latency": [0.0, 3.0]},
           "downlink": {"bandwidth": 1e12, "latency": 0.0}}
    loop = testing.run(testing.build("co2", {"tau": 2}, problem), problem, 3, system=_system(cfg))
    assert loop.clock.history == pytest.approx([2.0, 3.0, 3.0], rel=1e-9)
    assert loop.clock.summary()["idle_client_s_mean"] == pytest.approx(1 / 6, rel=1e-6)
