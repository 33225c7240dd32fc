"""Pure graph builders: undirected ``nx.Graph`` on nodes 0..n-1, no edge weights, no self loops.

Deterministic ones take only sizes; random ones take an integer ``seed`` that is passed to
networkx as is (the registered factories derive it from the run seed with `fedsim.rng`).
Deterministic graphs are built from numpy edge arrays, so n = 4096 takes milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import networkx as nx
import numpy as np

from fedsim import rng
from fedsim.errors import ConfigError

__all__ = ["from_edges", "circulant", "ring_graph", "torus_graph", "square_shape",
           "exponential_offsets", "exponential_graph", "star_graph", "complete_graph",
           "erdos_renyi_graph", "small_world_graph", "random_regular_graph", "sample_connected"]


def from_edges(n: int, edges: np.ndarray | Iterable[tuple[int, int]]) -> nx.Graph:
    """Graph on nodes 0..n-1 (all present, in order) with `edges` [m, 2]; self loops dropped."""
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    G = nx.Graph()
    G.add_nodes_from(range(n))
    G.add_edges_from(e[e[:, 0] != e[:, 1]].tolist())
    return G


def circulant(n: int, offsets: Iterable[int]) -> nx.Graph:
    """Node i linked to i ± o (mod n) for each offset o; duplicates and self loops dropped."""
    i = np.arange(n, dtype=np.int64)
    edges = [np.stack([i, (i + int(o)) % n], axis=1) for o in offsets]
    return from_edges(n, np.concatenate(edges) if edges else np.empty((0, 2), np.int64))


def ring_graph(n: int) -> nx.Graph:
    """Cycle 0-1-...-(n-1)-0 (a single edge for n = 2, no edge for n = 1). Degree 2."""
    return circulant(n, [1])


def square_shape(n: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols = n, rows <= cols, rows as large as possible."""
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return rows, n // rows


def torus_graph(rows: int, cols: int) -> nx.Graph:
    """2-D periodic grid: node r * cols + c linked to its 4 wrap-around neighbours.

    Degree 4 when rows, cols >= 3; a side of 2 or 1 merges or drops the wrap edges (a 1 x n
    torus is a ring).
    """
    r, c = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
    right = np.stack([r * cols + c, r * cols + (c + 1) % cols], axis=1)
    down = np.stack([r * cols + c, ((r + 1) % rows) * cols + c], axis=1)
    return from_edges(rows * cols, np.concatenate([right, down]))


def exponential_offsets(n: int) -> list[int]:
    """The offsets 2^k, k = 0..floor(log2(n - 1)), of the static exponential graph (n >= 2)."""
    return [2 ** k for k in range((n - 1).bit_length())] if n >= 2 else []


def exponential_graph(n: int) -> nx.Graph:
    """Node i linked to i ± 2^k (mod n) for k = 0..floor(log2(n - 1)).

    The undirected version of BlueFog's ``ExponentialTwoGraph`` (Ying et al., NeurIPS 2021):
    degree 2 * log2(n) - 1 when n is a power of two (the ± n/2 neighbours coincide).
    """
    return circulant(n, exponential_offsets(n))


def star_graph(n: int) -> nx.Graph:
    """Node 0 is the centre, linked to 1..n-1 (the FL server layout)."""
    return from_edges(n, [(0, j) for j in range(1, n)])


def complete_graph(n: int) -> nx.Graph:
    """Every pair of nodes linked."""
    return nx.complete_graph(n)


def erdos_renyi_graph(n: int, p: float, *, seed: int) -> nx.Graph:
    """G(n, p): each pair linked independently with probability p (networkx fast sampler)."""
    return nx.fast_gnp_random_graph(n, p, seed=seed)  # nodes 0..n-1 in order, no self loops


def small_world_graph(n: int, k: int, p: float, *, seed: int) -> nx.Graph:
    """Watts-Strogatz: ring lattice with k nearest neighbours, each edge rewired w.p. p."""
    return from_edges(n, list(nx.watts_strogatz_graph(n, k, p, seed=seed).edges()))


def random_regular_graph(n: int, degree: int, *, seed: int) -> nx.Graph:
    """Uniform random `degree`-regular graph (n * degree even, degree < n)."""
    return from_edges(n, list(nx.random_regular_graph(degree, n, seed=seed).edges()))


def sample_connected(sample: Callable[[int], nx.Graph], seed: int, *, key: str, value: object,
                     hint: str, tries: int = 100) -> nx.Graph:
    """First connected graph among ``sample(s_a)``, s_a = keyed seed of attempt a = 0, 1, ...

    Raises:
      ConfigError: (naming `key`) when `tries` samples were all disconnected.
    """
    for attempt in range(tries):
        G = sample(rng.key(seed, rng.TOPOLOGY, attempt) % 2 ** 32)
        if G.number_of_nodes() <= 1 or nx.is_connected(G):
            return G
    raise ConfigError(f"no connected graph in {tries} samples", key=key, value=value,
                      allowed=hint)
