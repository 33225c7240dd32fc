"""Availability traces (participation kind `trace`): parsing, the clients online at the round's
simulated start, waiting for the next client, FedBuff on a trace, and bad trace files (exit 2)."""

from __future__ import annotations

import pytest
import torch

from fedsim import testing
from fedsim.config_system import SystemCfg
from fedsim.errors import ConfigError
from fedsim.participation import build_participation
from fedsim.system import SystemModel
from tests.conftest import run_cli, small_scenario, write_scenario

LINKS = {"uplink": {"bandwidth": 256.0, "latency": 0.0}, "downlink": {"bandwidth": 256.0, "latency": 0.0}}


def _trace(tmp_path, text: str, n: int = 3):
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return build_participation("trace", {"file": str(path)}, num_clients=n, seed=0, label_dist=None)


def test_online_intervals_are_half_open_and_unlisted_clients_are_offline(tmp_path):
    part = _trace(tmp_path, "client,online_from,online_until\n0,0,2\n0,5,inf\n2,1.5,3\n")
    assert part.online(0.0).tolist() == [True, False, False]
    assert part.online(1.5).tolist() == [True, False, True]
    assert part.online(2.0).tolist() == [False, False, True]
    assert part.online(3.0).tolist() == [False, False, False]
    assert part.online(1e9).tolist() == [True, False, False]
    assert part.next_online(3.0) == 5.0 and part.next_online(5.0) is None


def test_sync_rounds_take_the_clients_online_at_the_round_start_and_wait_for_the_next(tmp_path):
    """FedAvg, 2 steps of one 'sample' at 1 sample/s + 1 s of transfers: a round lasts 3 s.
    Trace: client 0 in [0, 4), client 1 in [2, 10), client 2 from 20. Round 0 at 0: {0} -> 3;
    round 1 at 3: {0, 1} -> 6; round 2 at 6: {1} -> 9; round 3 at 9: {1} -> 12; round 4: nobody
    until 20 (8 s offline): {2} -> 23."""
    part = _trace(tmp_path, "client,online_from,online_until\n0,0,4\n1,2,10\n2,20,inf\n")
    problem = testing.heterogeneous_quadratic(num_clients=3, dim=2, seed=0)
    strat = testing.build("fedavg", {"lr": 0.1, "local_steps": 2}, problem)
    system = SystemModel(SystemCfg(speed=1.0, speed_unit="samples", **LINKS), 3, 0, 0.0)
    times: list[float] = []
    loop = testing.run(strat, problem, 5, participation=part, system=system, eval_every=1,
                       on_eval=lambda m: times.append(m["sim_time_s"]))
    assert times == [3.0, 6.0, 9.0, 12.0, 23.0]
    assert loop.clock.offline == 8.0
    masks = testing.MaskParticipation([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]])
    same = testing.run(strat, problem, 5, participation=masks, system=system)
    torch.testing.assert_close(loop.state.server["x"], same.state.server["x"], rtol=0, atol=0)
    parts = loop.clock.summary()
    assert parts["compute_s"] + parts["comm_s"] + parts["server_s"] + parts["offline_s"] == 23.0


def test_fedbuff_starts_only_online_clients(tmp_path):
    """C = 2, K = 1, 3 s per client. Client 1 comes online at 4: until then only client 0
    trains (arrivals at 3, 6); client 1 starts at 4 (from version 1) and arrives at 7."""
    part = _trace(tmp_path, "client,online_from,online_until\n0,0,inf\n1,4,inf\n")
    problem = testing.heterogeneous_quadratic(num_clients=2, dim=2, seed=0)
    strat = testing.build("fedavg", {"lr": 0.1, "local_steps": 2}, problem)
    system = SystemModel(SystemCfg(speed=1.0, speed_unit="samples", asynchrony={"concurrency": 2},
                                   **LINKS), 2, 0, 0.0)
    loop = testing.run(strat, problem, 3, participation=part, system=system)
    assert loop.asyn is not None and loop.asyn.log == [(0, 0, 0, 3.0), (1, 0, 0, 6.0), (2, 1, 1, 7.0)]
    # nobody online until 5, nobody in flight: the clock waits (offline), then both start at 5
    later = _trace(tmp_path, "client,online_from,online_until\n0,5,inf\n1,5,inf\n", n=2)
    loop = testing.run(strat, problem, 2, participation=later, system=system)
    assert loop.asyn.log == [(0, 0, 0, 8.0), (1, 1, 1, 8.0)] and loop.clock.offline == 5.0


@pytest.mark.parametrize("text, where, what", [
    ("client,online_from\n0,1\n", "line 1", "online_until"),
    ("client,online_from,online_until\n7,0,1\n", "line 2.client", "unknown client id"),
    ("client,online_from,online_until\n0,-1,1\n", "line 2.online_from", "bad value"),
    ("client,online_from,online_until\n0,0,5\n1,0,1\n0,4,9\n", "line 4.online_from", "overlaps"),
    ("client,online_from,online_until\n0,3,1\n", "line 2.online_until", "after online_from"),
    ("client,online_from,online_until\nx,0,1\n", "line 2.client", "not a number"),
])
def test_bad_trace_names_file_line_and_value(tmp_path, text, where, what):
    with pytest.raises(ConfigError) as err:
        _trace(tmp_path, text)
    assert err.value.file == str(tmp_path / "trace.csv") and err.value.key == where
    assert what in str(err.value)


def test_bad_trace_or_missing_file_exits_2_from_the_cli(tmp_path, capsys):
    bad = tmp_path / "trace.csv"
    bad.write_text("client,online_from,online_until\n0,0,5\n0,2,9\n")
    for file, expect in ((str(bad), "trace.csv: participation.line 3.online_from"),
                         (str(tmp_path / "nope.csv"), "participation.file")):
        path = write_scenario(tmp_path, small_scenario(participation={"kind": "trace", "file": file}))
        code, _, err = run_cli(["run", path, "--quiet", "--out", str(tmp_path / "runs")], capsys)
        assert code == 2 and expect in err and "Traceback" not in err, err


def test_async_on_gossip_flower_robust_or_stale_exits_2_naming_the_key(tmp_path, capsys):
    asyn = {"asynchrony": {"concurrency": 2}}
    gossip = small_scenario(strategy={"name": "gossip", "lr": 0.1}, participation={"kind": "full"},
                            topology={"kind": "ring"}, system=asyn)
    flower = small_scenario(system=asyn, engine={"kind": "flower"})
    robust = small_scenario(strategy={"aggregator": {"name": "median"}}, system=asyn)
    stale = small_scenario(strategy={"name": "co2", "tau": 2, "lr": 0.1, "batch_size": 8}, system=asyn)
    for body, expect in ((gossip, "system.asynchrony"), (flower, "system.asynchrony"),
                         (robust, "system.asynchrony"), (stale, "system.asynchrony")):
        path = write_scenario(tmp_path, body)
        code, _, err = run_cli(["run", path, "--quiet", "--out", str(tmp_path / "runs")], capsys)
        assert code == 2 and expect in err and "Traceback" not in err, err


def test_flower_and_multiplex_agree_on_a_trace(tmp_path):
    """The same trace scenario (clients leaving and joining, a gap nobody is online) on the Flower
    engine and on multiplex: the same participants, model and sim_time_s."""
    from tests.flower_apps.support import assert_same_run, case, final, flower, reference

    rows = ["client,online_from,online_until"] + [f"{c},{c * 0.05},{0.2 + c * 0.05}" for c in range(8)]
    rows += [f"{c},3,inf" for c in range(0, 8, 2)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    body = case("scaffold", participation={"kind": "trace", "file": str(tmp_path / "t.csv")}, rounds=8)
    ref, ref_hist = reference(body)
    adapter, hist = flower(body)
    assert_same_run(ref, ref_hist, final(adapter), hist)
    assert ref.clock.offline > 0 and ref_hist[-1]["sim_time_s"] > 3
