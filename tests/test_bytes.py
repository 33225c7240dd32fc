"""The one byte rule, by hand, for every registered strategy with its defaults.

6 clients (ring of 6 for gossip), P = 5 float64 parameters, full participation, two rounds.
A dense row of P values is 5 * 8 = 40 bytes. The default compressors are top_k(ratio 0.1):
k = ceil(0.5) = 1 value (64 bits) + one index of ceil(log2 5) = 3 bits -> ceil(67 / 8) = 9 bytes.
EF21-type strategies send their first message densely (init "dense"); EF21-W also sends its
estimated L_i once (one value). Downlink: every broadcast server key, dense, to every
participant. Gossip: a node's payload once per neighbour (2 on a ring), down = up.
"""

from __future__ import annotations

import pytest

from fedsim import testing
from strategies import STRATEGIES
from topologies import build_topology

N, P, ROW = 6, 5, 40
TOP1 = 9
# name: ((up per client in round 0, round 1), down per client: number of broadcast rows)
EXPECTED = {
    "fedavg": ((ROW, ROW), 1), "fedavgm": ((ROW, ROW), 1), "fedau": ((ROW, ROW), 1),
    "fedavg-all": ((ROW, ROW), 1), "known-prob": ((ROW, ROW), 1), "fedvarp": ((ROW, ROW), 1),
    "mifa": ((ROW, ROW), 1), "co2": ((ROW, ROW), 1), "slowmo": ((ROW, ROW), 1),
    "local-sgd": ((ROW, ROW), 1), "gd": ((ROW, ROW), 1),
    "scaffold": ((2 * ROW, 2 * ROW), 2),              # delta + dc up; x + c down
    "fedavg-m": ((ROW, ROW), 2),                      # x + g down
    "fedavg-m-vr": ((ROW, ROW), 3),                   # x + g + x_prev down
    "scaffold-m": ((2 * ROW, 2 * ROW), 3),            # x + g + c down
    "scaffold-m-vr": ((2 * ROW, 2 * ROW), 4),         # x + g + c + x_prev down
    "ef21": ((ROW, TOP1), 1), "econtrol": ((ROW, TOP1), 1),
    "ef21-w": ((ROW + 8, TOP1), 1),                   # + L_i once
    "compressed-gd": ((TOP1, TOP1), 1),
    "fedprox": ((ROW, ROW), 1), "fedadam": ((ROW, ROW), 1), "fedyogi": ((ROW, ROW), 1),
    "fedadagrad": ((ROW, ROW), 1), "feddyn": ((ROW, ROW), 1),   # FedDyn's h stays on the server
    "dp-fedavg": ((ROW, ROW), 1),                     # fixed clip: nothing but the clipped delta
    "fednova": ((ROW + 8, ROW + 8), 1),               # normalised delta + a_i (one value)
}
GOSSIP = {"gossip": ROW, "gossip-var": ROW, "choco": TOP1}   # per message; stats are derived


def test_every_registered_strategy_has_a_byte_expectation():
    assert set(EXPECTED) | set(GOSSIP) == set(STRATEGIES.names())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_server_strategy_bytes_by_hand(name):
    problem = testing.heterogeneous_quadratic(num_clients=N, dim=P, seed=1)
    loop = testing.run(testing.build(name, {}, problem), problem, 2)
    (up0, up1), down_rows = EXPECTED[name]
    assert loop.state.bytes.per_round == [(N * up0, N * down_rows * ROW), (N * up1, N * down_rows * ROW)]


@pytest.mark.parametrize("name", sorted(GOSSIP))
def test_gossip_bytes_count_one_message_per_edge(name):
    problem = testing.heterogeneous_quadratic(num_clients=N, dim=P, seed=1)
    loop = testing.run(testing.build(name, {}, problem), problem, 2,
                       topology=build_topology("ring", {}, n=N, seed=0))
    per_round = N * 2 * GOSSIP[name]
    assert loop.state.bytes.per_round == [(per_round, per_round)] * 2
