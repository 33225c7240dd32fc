"""The `Topology` type, the topology registry and `build_topology` / `describe`.

A topology is a function round -> undirected graph on nodes 0..n-1 (BlueFog's dynamic
iterators made random-access, so MPI ranks and Flower nodes agree without shared state), plus
mixing matrices cached per distinct graph and rule. Static topologies hold one graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import networkx as nx
import numpy as np

from fedsim.errors import ConfigError
from fedsim.registry import Registry
from topologies.mixing import MIXING_RULES, MixingMatrix, mixing_matrix, spectral_gap

__all__ = ["TOPOLOGIES", "Topology", "build_topology", "describe"]

TOPOLOGIES = Registry("topologies", builtins=("topologies.generators", "topologies.dynamic"),
                      reserved=("n", "seed"))

_CACHE_MAX = 256  # distinct graphs kept per topology (a periodic schedule needs `period`)


class Topology:
    """A communication graph over nodes 0..n-1, possibly changing with the round.

    Args:
      kind: registered name (shown by `describe`).
      n: number of nodes.
      graph: the graph of a static topology, or a function ``round -> nx.Graph``.
      period: for a time-varying topology, rounds t and t + period have the same graph, so the
        graph and mixing caches are keyed by ``round % period``. ``None``: keyed by round.

    Graphs are returned frozen (``nx.freeze``): share them, do not edit them.
    """

    def __init__(self, kind: str, n: int, graph: nx.Graph | Callable[[int], nx.Graph], *,
                 period: int | None = None) -> None:
        self.kind, self.n = kind, int(n)
        self.static = isinstance(graph, nx.Graph)
        self._graph_at = graph if callable(graph) and not self.static else None
        self.period = 1 if self.static else period
        self._graphs: dict[int, nx.Graph] = {}
        self._mixing: dict[tuple[int, str], MixingMatrix] = {}
        if self.static:
            self._graphs[0] = self._checked(graph)

    def __repr__(self) -> str:
        return f"Topology({self.kind!r}, n={self.n}, static={self.static})"

    def _key(self, round: int) -> int:
        return round % self.period if self.period else round

    def _checked(self, G: nx.Graph) -> nx.Graph:
        if G.is_directed() or G.number_of_nodes() != self.n:
            raise ValueError(f"{self.kind}: expected an undirected graph on {self.n} nodes")
        return G if nx.is_frozen(G) else nx.freeze(G)

    def graph(self, round: int = 0) -> nx.Graph:
        """The (frozen, undirected, unweighted) graph used in round `round`."""
        key = self._key(round)
        G = self._graphs.get(key)
        if G is None:
            assert self._graph_at is not None
            G = self._checked(self._graph_at(round))
            _bounded_put(self._graphs, key, G)
        return G

    def mixing(self, round: int = 0, rule: str = "metropolis") -> MixingMatrix:
        """Mixing matrix of round `round`'s graph under `rule` (see `mixing_matrix`), cached."""
        if rule not in MIXING_RULES:
            raise ConfigError("unknown mixing rule", value=rule, allowed=", ".join(MIXING_RULES))
        key = (self._key(round), rule)
        W = self._mixing.get(key)
        if W is None:
            W = mixing_matrix(self.graph(round), rule)
            _bounded_put(self._mixing, key, W)
        return W


def _bounded_put(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_MAX:
        cache.pop(next(iter(cache)))  # oldest first
    cache[key] = value


def build_topology(kind: str, params: dict[str, Any], *, n: int, seed: int) -> Topology:
    """Build a registered topology from a scenario's ``topology:`` keys.

    Args:
      kind: registered name (``fedsim list topologies``) or a dotted path ``pkg.mod:factory``.
      params: the other keys; validated against the factory signature (ConfigError naming the
        key, e.g. ``degree``; the caller prefixes the path, e.g. ``topology.degree``).
      n: number of nodes (>= 1). seed: the run's root seed.
    """
    if int(n) < 1:
        raise ConfigError("a topology needs at least one node", key="n", value=n, allowed=">= 1")
    topo = TOPOLOGIES.build(kind, dict(params), n=int(n), seed=int(seed))
    if getattr(topo, "n", None) != n:
        raise ConfigError(f"the topology factory returned {type(topo).__name__}, not a Topology on {n} "
                          "nodes", key="kind", value=kind)
    return topo


def describe(topo: Topology, rule: str = "metropolis", round: int = 0) -> dict[str, Any]:
    """Summary of round `round`'s graph: size, degrees, connectivity and spectral gap of W(rule).

    Returns:
      ``{"kind", "nodes", "edges", "degree_min", "degree_max", "connected", "spectral_gap",
      "rule"}``; the gap is `spectral_gap` (ChocoSGD definition) of ``topo.mixing(round, rule)``.
    """
    G = topo.graph(round)
    deg = np.fromiter((d for _, d in G.degree()), dtype=np.int64, count=G.number_of_nodes())
    W = topo.mixing(round, rule)
    return {"kind": getattr(topo, "kind", type(topo).__name__), "nodes": G.number_of_nodes(),
            "edges": W.num_edges(), "degree_min": int(deg.min()), "degree_max": int(deg.max()),
            "connected": bool(nx.is_connected(G)), "spectral_gap": spectral_gap(W), "rule": rule}
