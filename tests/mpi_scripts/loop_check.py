"""Run under mpiexec (tests/test_mpi.py): the MPI round loop equals the in-process loop.

Each rank runs the in-process reference (LocalComm, all clients) and its MPI slice on closed-form
quadratics, then compares its owned rows / the replicated server model. Cases: rounds where only
the last rank, nobody, or only rank 0 takes part (partial None, signature agreement, skipped
collective); a one-step-stale reduction (the Iallreduce overlap); gossip with two mixing
operators on a ring and a random graph (neighbour exchange, halo size); robust aggregation under
Byzantine clients (the rows allgathered in rank order) and DP-FedAvg's keyed noise and adaptive
clip; then every registered strategy. Prints "ok <case>" on rank 0; any mismatch or exception
prints the reason and aborts the job (exit 1): nothing is skipped.
"""

from __future__ import annotations

import sys
import warnings

import networkx as nx
import numpy as np
import torch
from mpi4py import MPI

from fedsim import testing
from fedsim.attacks import ATTACKS, with_attack
from fedsim.comm.mpi import MPIComm
from fedsim.engines.loop import RoundLoop
from fedsim.engines.mpi import model_fingerprint
from fedsim.robust import AGGREGATORS, with_aggregator
from fedsim.types import Strategy
from fedsim.work import WORK
from strategies import STRATEGIES
from topologies import Topology

WORLD = MPI.COMM_WORLD
N, DIM, ROUNDS = 7, 5, 6


def graph_topology(graph: nx.Graph) -> Topology:
    """A static topology on a given graph (Metropolis weights by default)."""
    return Topology("graph", graph.number_of_nodes(), graph)


def two_key_gossip(lr: float = 0.1) -> Strategy:
    """D-SGD whose payload has a W-mixed key and a neighbour-mean key (two operators)."""
    def local(server, clients, oracle, ctx):
        y = clients["x"]
        _, g = oracle(y, 0)
        y = y - lr * g
        return {"x": y, "z": 2 * y}, clients, {}

    def node_update(clients, mixed, ctx):
        return {"x": mixed["x"] + 0.01 * (mixed["z"] - 2 * mixed["x"])}

    return Strategy(init_server=lambda x0: {},
                    init_clients=lambda x0, ids: {"x": x0.expand(len(ids), -1).clone()},
                    local=local, node_update=node_update, comm="mix", mixing={"x": "W", "z": "mean"},
                    broadcast=())


def masks() -> np.ndarray:
    """Round masks: only the last client, nobody, only client 0, everyone, then random."""
    m = np.zeros((ROUNDS, N), dtype=bool)
    m[0, N - 1] = True
    m[2, 0] = True
    m[3] = True
    m[4:] = np.random.default_rng(0).random((ROUNDS - 4, N)) < 0.5
    return m


def fail(msg: str) -> None:
    print(f"error: rank {WORLD.rank}: {msg}", file=sys.stderr, flush=True)
    WORLD.Abort(1)


def compare(name: str, make, participation=None, topology=None, work=None) -> RoundLoop:
    problem = testing.heterogeneous_quadratic(N, DIM, seed=1)
    x0 = torch.linspace(-1, 1, DIM, dtype=torch.float64)
    ref = testing.run(make(problem), problem, ROUNDS, x0=x0, participation=participation,
                      topology=topology, eval_every=2, work=work)
    comm = MPIComm(WORLD.Dup(), N)
    hist = []
    loop = RoundLoop(make(problem), problem, x0, rounds=ROUNDS, seed=0, participation=participation,
                     topology=topology, comm=comm, owned=comm.owned(), eval_every=2,
                     on_eval=hist.append, chunk_size=2, work=work)
    loop.run()
    mine = torch.as_tensor(comm.owned())
    if loop.strategy.comm == "reduce":
        got, want = loop.state.server[loop.strategy.model_key], ref.state.server[ref.strategy.model_key]
    else:
        got = loop.state.store.gather(mine)[loop.strategy.model_key]
        want = testing.final_models(ref)[mine]
    if not torch.allclose(got, want, rtol=1e-10, atol=1e-12):
        fail(f"{name}: final model differs from the in-process loop by {float((got - want).abs().max())}")
    if WORLD.rank == 0:
        ref_hist = []
        testing.run(make(problem), problem, ROUNDS, x0=x0, participation=participation, topology=topology,
                    eval_every=2, on_eval=ref_hist.append, work=work)
        for a, b in zip(hist, ref_hist, strict=True):
            for k in ("train_loss", "test_loss", "bytes_up", "bytes_down", "consensus_distance",
                      "sim_time_s", "dp_epsilon", "dp_clip"):
                if (a.get(k) is None) != (b.get(k) is None) or (
                        a.get(k) is not None and not np.isclose(a[k], b[k], rtol=1e-10, atol=1e-14)):
                    fail(f"{name}: metric {k} at round {a['round']}: {a.get(k)} != {b.get(k)}")
        print(f"ok {name}", flush=True)
    return loop


def robust_cases(part) -> None:
    """Aggregators that gather rows (uneven slices, rounds where one rank has no row) under attacks,
    and DP-FedAvg with noise and an adaptive clip (replicated server-side draws)."""
    flip = ATTACKS.build("sign_flip", {"fraction": 0.3, "scale": 3.0}, num_clients=N, seed=0)
    noise = ATTACKS.build("random", {"fraction": 0.3}, num_clients=N, seed=0)

    def robust(name, agg, params, attack, participation=None):
        return lambda p: with_aggregator(with_attack(testing.build(name, {}, p, participation), attack),
                                         AGGREGATORS.build(agg, params))
    compare("fedavg-median-signflip-masks", robust("fedavg", "median", {}, flip, part), part)
    trimmed = robust("scaffold", "trimmed-mean", {"beta": 0.2}, noise, part)
    compare("scaffold-trimmed-random-masks", trimmed, part)
    compare("fedavg-krum-signflip-full", robust("fedavg", "krum", {"f": 2}, flip))
    dp = {"noise_multiplier": 0.5, "adaptive": True, "clip_count_stddev": 1.0}
    compare("dp-fedavg-adaptive-noise-masks", lambda p: testing.build("dp-fedavg", dp, p, part), part)


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Sparse")
    part = testing.MaskParticipation(masks())
    part.probabilities = np.full(N, 0.5)  # for oracle baselines (known-prob)
    def stale(p):
        return testing.build("fedavg", {"lr": 0.1, "local_steps": 3})._replace(staleness=1)
    compare("fedavg-stale1-masks", stale, part)
    uneven = WORK.build("uniform", {"low": 0, "high": 6}, num_clients=N, seed=0, sizes=np.ones(N),
                        batch_size=None)
    compare("scaffold-uneven-work-masks", lambda p: testing.build("scaffold", {}, p), part, work=uneven)
    robust_cases(part)
    ring = graph_topology(nx.cycle_graph(N))
    loop = compare("two-key-gossip-ring", lambda p: two_key_gossip(), topology=ring)
    want_halo = 0 if WORLD.size == 1 else 2  # a ring slice reads one row from each side
    if loop.comm.halo_rows != want_halo * ROUNDS or loop.comm.sent_rows != want_halo * ROUNDS:
        fail(f"ring halo: received {loop.comm.halo_rows}, sent {loop.comm.sent_rows} rows in "
             f"{ROUNDS} rounds, want {want_halo} per round (boundary rows only)")
    if WORLD.rank == 0:
        print(f"ok ring-halo {want_halo} rows/round", flush=True)
    compare("two-key-gossip-random", lambda p: two_key_gossip(),
            topology=graph_topology(nx.gnp_random_graph(N, 0.4, seed=2)))
    for name in STRATEGIES.names():  # every registered strategy with its defaults
        make = lambda p, n=name: testing.build(n, {}, p, part)  # noqa: E731
        if make(testing.heterogeneous_quadratic(N, DIM)).comm == "reduce":
            compare(f"{name}-masks", make, part)
        else:
            compare(f"{name}-ring", make, topology=ring)
    fp = model_fingerprint(torch.ones(2, 3, dtype=torch.float64), torch.tensor([0, 1]))
    if not torch.isclose(fp[0], torch.tensor(6.0, dtype=torch.float64)):
        fail("fingerprint")


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - any failure ends the job on every rank
        fail(f"{type(exc).__name__}: {exc}")
