"""Registered time-varying topologies: the graph is a pure function of the round.

Random access (``graph(round)``) rather than BlueFog's iterators
(``GetDynamicOnePeerSendRecvRanks``), so every MPI rank or Flower node computes the same graph
for round t without shared state, and a resumed run picks up at any round.
"""

from __future__ import annotations

import networkx as nx
import numpy as np

from topologies import graphs
from topologies.base import TOPOLOGIES, Topology

__all__ = ["one_peer_exponential", "one_peer_exponential_graph", "one_peer_period"]


def one_peer_period(n: int) -> int:
    """Number of distinct rounds of the schedule: ceil(log2 n) (1 for n = 1)."""
    return max(1, (n - 1).bit_length())


def one_peer_exponential_graph(n: int, round: int) -> nx.Graph:
    """Round `round`'s matching: node i paired with i XOR 2^k, k = round mod ceil(log2 n).

    A node whose partner i XOR 2^k is >= n sits the round out (self weight 1).
    """
    k = round % one_peer_period(n)
    i = np.arange(n, dtype=np.int64)
    j = i ^ (1 << k)
    keep = (j < n) & (i < j)
    return graphs.from_edges(n, np.stack([i[keep], j[keep]], axis=1))


@TOPOLOGIES.register("one_peer_exponential")
def one_peer_exponential(*, n: int, seed: int) -> Topology:
    """Time-varying one-peer exponential (hypercube) graph: a perfect matching per round.

    Round t uses k = t mod ceil(log2 n) and pairs node i with i XOR 2^k (nodes whose partner
    would be >= n idle that round). Every round's graph is a matching, so each node talks to at
    most one peer and both rules give W_t = (I + P_t) / 2 on matched pairs. When n is a power of
    two, the product of W_t over one period of log2 n rounds is exactly J / n (exact averaging,
    as in a hypercube all-reduce). For any n the union of a period's graphs is connected (every
    node reaches 0 by clearing its bits one at a time), so the sequence is jointly connected,
    but a single round's graph is disconnected (spectral gap 0) for n > 2.

    This is the symmetric (undirected, pairwise) variant; Ying et al.'s one-peer exponential
    graph is directed (i sends to i + 2^k mod n) and is not symmetric.

    References:
      Ying et al., Exponential Graph is Provably Efficient for Decentralized Deep Training,
      NeurIPS 2021. Koloskova et al., ICML 2020 (theory for changing topologies).
    """
    period = one_peer_period(n)
    return Topology("one_peer_exponential", n, lambda t: one_peer_exponential_graph(n, t),
                    period=period)
