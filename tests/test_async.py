"""FedBuff / FedAsync on the simulated clock: hand-computed event order and staleness, FedBuff with
C = K = N and no staleness equals FedAvg, determinism, chunking, checkpoints and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim import testing
from fedsim.asynchrony import staleness_weight
from fedsim.config_system import StalenessCfg, SystemCfg
from fedsim.system import SystemModel

FAST_LINKS = {"uplink": {"bandwidth": 1e15, "latency": 0.0}, "downlink": {"bandwidth": 1e15, "latency": 0.0}}


def _system(n: int, asynchrony: dict | None, **cfg) -> SystemModel:
    body = {"speed_unit": "samples", **FAST_LINKS, **cfg}
    if asynchrony is not None:
        body["asynchrony"] = asynchrony
    return SystemModel(SystemCfg(**body), n, 0, flops_per_sample=0.0)


def _three() -> testing.QuadraticProblem:
    return testing.QuadraticProblem([[1.0, 2.0], [3.0, 1.0], [0.5, 1.5]],
                                    [[0.0, 1.0], [1.0, 0.0], [2.0, -1.0]])


def test_three_clients_by_hand_event_order_and_staleness():
    """Speeds 1, 2, 4 samples/s, 2 local steps of one 'sample' (2, 1, 0.5 s), 16 bytes down and up
    at 256 bit/s (0.5 s each): 3, 2 and 1.5 s per client; C = 3, K = 1 (FedAsync). All start at 0
    from version 0. Arrivals: 2 at 1.5 (tau 0) -> v1, 2 restarts (-> 3.0); 1 at 2.0 (tau 1) -> v2,
    1 restarts (-> 4.0); at 3.0 clients 0 (v0) and 2 (v1) tie: 0 first (tau 2) -> v3, 0 restarts;
    then 2 (tau 3 - 1 = 2) -> v4, 2 restarts (-> 4.5); 1 at 4.0 (started v2: tau 2) -> v5; 2 at
    4.5 (tau 1) -> v6. The model follows x += s(tau) delta, s = 1/sqrt(1+tau)."""
    problem = _three()
    strat = testing.build("fedavg", {"lr": 0.1, "local_steps": 2}, problem)
    links = {"uplink": {"bandwidth": 256.0, "latency": 0.0}, "downlink": {"bandwidth": 256.0, "latency": 0.0}}
    system = _system(3, {"concurrency": 3, "buffer": 1}, speed=[1.0, 2.0, 4.0], **links)
    times: list[float] = []
    loop = testing.run(strat, problem, 6, system=system, eval_every=1,
                       on_eval=lambda m: times.append(m["sim_time_s"]))
    want = [(0, 2, 0, 1.5), (1, 1, 1, 2.0), (2, 0, 2, 3.0), (3, 2, 2, 3.0), (4, 1, 2, 4.0), (5, 2, 1, 4.5)]
    assert loop.asyn is not None and loop.asyn.log == want
    assert times == [1.5, 2.0, 3.0, 3.0, 4.0, 4.5]
    # each interval's length splits by its arrival's compute share (client 0: 2/3, 1: 1/2, 2: 1/3)
    parts = loop.clock.summary()
    assert parts["compute_s"] + parts["comm_s"] + parts["server_s"] + parts["offline_s"] == pytest.approx(4.5)
    assert parts["compute_s"] == pytest.approx(1.5 / 3 + 0.5 / 2 + 1.0 * 2 / 3 + 0 + 1.0 / 2 + 0.5 / 3)
    # the same by hand: each client's 2 gradient steps from the model of its start version
    h, c = problem.h, problem.c
    def delta(i, x):
        y = x.clone()
        for _ in range(2):
            y = y - 0.1 * h[i] * (y - c[i])
        return y - x
    versions = [torch.zeros(2, dtype=torch.float64)]
    start = {0: 0, 1: 0, 2: 0}
    for _, client, tau, _ in want:
        x = versions[-1]
        versions.append(x + (1 + tau) ** -0.5 * delta(client, versions[start[client]]))
        start[client] = len(versions) - 1
    torch.testing.assert_close(loop.state.server["x"], versions[-1], rtol=1e-14, atol=1e-14)


def test_fedbuff_with_everyone_and_no_staleness_is_fedavg():
    """C = K = N: every client starts from version t and the buffer is applied once all arrived:
    FedAvg's rounds, model and times (the slowest client, 3 full passes of 5 samples at 0.5/s,
    + the server step) exactly."""
    problem = testing.heterogeneous_quadratic(num_clients=5, dim=3, seed=2)
    problem.sizes = np.array([1, 3, 2, 5, 4])
    strat = testing.build("fedavg", {"lr": 0.05, "local_steps": 3}, problem)
    speeds = [1.0, 3.0, 2.0, 0.5, 4.0]
    h_sync: list[dict] = []
    h_async: list[dict] = []
    sync = testing.run(strat, problem, 4, system=_system(5, None, speed=speeds, server_time=0.25),
                       eval_every=1, on_eval=h_sync.append)
    asyn = testing.run(strat, problem, 4, system=_system(5, {"concurrency": 5, "buffer": 5},
                                                            speed=speeds, server_time=0.25),
                       eval_every=1, on_eval=h_async.append)
    torch.testing.assert_close(asyn.state.server["x"], sync.state.server["x"], rtol=1e-13, atol=1e-15)
    t_sync, t_async = [m["sim_time_s"] for m in h_sync], [m["sim_time_s"] for m in h_async]
    assert t_async == pytest.approx(t_sync, rel=1e-12)
    for a, b in zip(h_async, h_sync, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-12)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-12)
    assert t_sync == pytest.approx([(3 * 5 / 0.5 + 0.25) * r for r in (1, 2, 3, 4)])  # client 3
    assert asyn.state.bytes.per_round == sync.state.bytes.per_round


def test_fedbuff_is_deterministic_and_chunking_does_not_change_it():
    problem = testing.heterogeneous_quadratic(num_clients=9, dim=4, seed=3)
    strat = testing.build("scaffold", {"lr": 0.05, "local_steps": 3}, problem)
    cfg = {"concurrency": 5, "buffer": 2, "staleness": {"kind": "hinge", "a": 2.0, "b": 1}}
    speed = {"kind": "lognormal", "median": 2.0, "sigma": 1.0}
    runs = [testing.run(strat, problem, 8, system=_system(9, cfg, speed=speed, jitter=0.3), chunk_size=c)
            for c in (None, None, 2)]
    assert runs[0].asyn.log == runs[1].asyn.log == runs[2].asyn.log
    assert max(tau for _, _, tau, _ in runs[0].asyn.log) > 0  # the case exercises staleness
    assert torch.equal(runs[0].state.server["x"], runs[1].state.server["x"])
    torch.testing.assert_close(runs[2].state.server["x"], runs[0].state.server["x"], rtol=1e-13, atol=1e-15)
    assert runs[0].clock.now == runs[2].clock.now


def test_clients_from_the_same_version_train_as_one_stacked_step(monkeypatch):
    """Equal speeds, C = 5, K = 2: 5 clients start at 0 and all arrive at 1.0 (ties); after the
    first arrival one more starts from the unchanged version 0, so version 0 trains as one
    client_step of 6 rows; each later interval starts 2 clients from one version (2 rows)."""
    from fedsim import round as kernel

    sizes: list[int] = []
    real = kernel.client_step
    monkeypatch.setattr(kernel, "client_step", lambda s, srv, cl, p, ctx, pr=None: (
        sizes.append(int(ctx.ids.numel())), real(s, srv, cl, p, ctx, pr))[1])
    problem = testing.heterogeneous_quadratic(num_clients=8, dim=2, seed=1)
    testing.run(testing.build("fedavg", {"lr": 0.1, "local_steps": 1}, problem), problem, 3,
                system=_system(8, {"concurrency": 5, "buffer": 2}, speed=1.0))
    assert sizes == [6, 2, 2]


def test_staleness_weights():
    tau = np.array([0, 1, 3, 8])
    assert staleness_weight(StalenessCfg(), tau) == pytest.approx(1 / np.sqrt(1 + tau))
    assert staleness_weight(StalenessCfg(kind="constant"), tau) == pytest.approx(np.ones(4))
    hinge = staleness_weight(StalenessCfg(kind="hinge", a=0.5, b=1), tau)
    assert hinge == pytest.approx([1.0, 1.0, 1 / (0.5 * 2 + 1), 1 / (0.5 * 7 + 1)])


def test_async_settings_are_checked():
    with pytest.raises(ValueError, match="buffer"):
        SystemCfg(asynchrony={"concurrency": 2, "buffer": 3})
    with pytest.raises(ValueError, match="deadline"):
        SystemCfg(asynchrony={"concurrency": 2}, deadline={"seconds": 1.0})
    problem = testing.heterogeneous_quadratic(num_clients=4, dim=2)
    with pytest.raises(ValueError, match="gossip"):
        testing.run(testing.build("gossip", {}, problem), problem, 1, system=_system(4, {"concurrency": 2}))


def test_checkpoint_holds_the_schedule_and_the_rows_in_flight(tmp_path):
    """Stopping after round 3 of a FedBuff run (clients in flight, trained rows not yet applied)
    and resuming gives the uninterrupted run's model, clock and metrics exactly."""
    from fedsim import checkpoint as ckpt
    from fedsim.engines.loop import RoundLoop

    problem = testing.heterogeneous_quadratic(num_clients=7, dim=3, seed=4)
    strat = testing.build("scaffold", {"lr": 0.05, "local_steps": 2}, problem)
    speed = {"kind": "lognormal", "median": 1.0, "sigma": 1.0}
    system = _system(7, {"concurrency": 4, "buffer": 2}, speed=speed)
    x0 = torch.zeros(3, dtype=torch.float64)

    def loop(rounds, lines):
        return RoundLoop(strat, problem, x0, rounds=rounds, seed=0, system=system, on_eval=lines.append)

    whole: list = []
    ref = loop(6, whole)
    ref.run()
    first: list = []
    control = ckpt.Control(str(tmp_path), 0, "d", lambda: len(first), lambda: 0)
    loop(3, first).run(control=control)
    rest: list = []
    resumed = loop(6, rest)
    resumed.run(control=ckpt.Control(str(tmp_path), 0, "d", lambda: 3, lambda: 0,
                                     resume=ckpt.latest(str(tmp_path))))
    assert torch.equal(resumed.state.server["x"], ref.state.server["x"])
    strip = [{k: v for k, v in m.items() if k != "wall_s"} for m in whole]
    assert [{k: v for k, v in m.items() if k != "wall_s"} for m in first + rest] == strip
    assert resumed.clock.now == ref.clock.now
