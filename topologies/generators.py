"""Registered static topologies: ``factory(*, n, seed, **params) -> Topology``.

`n` and `seed` come from the runtime; the other keyword arguments are a scenario's
``topology:`` keys, validated with pydantic from the annotations (ConfigError names the key).
Random graphs draw their networkx seed from ``fedsim.rng.key(seed, TOPOLOGY, attempt)``, so the
same run seed gives the same graph on every rank and engine.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

from annotated_types import Ge

from fedsim.constraints import Fraction, PositiveInt, Probability
from fedsim.errors import ConfigError
from topologies import graphs
from topologies.base import TOPOLOGIES, Topology

__all__ = ["star", "complete", "ring", "torus", "erdos_renyi", "small_world", "random_regular",
           "exponential", "edge_list", "read_edge_list"]



@TOPOLOGIES.register("star")
def star(*, n: int, seed: int) -> Topology:
    """Star: node 0 is the centre linked to every other node (the FL server layout).

    Metropolis weights: 1/n on the centre's row, leaves keep 1 - 1/n (gap 1/n).
    """
    return Topology("star", n, graphs.star_graph(n))


@TOPOLOGIES.register("complete")
def complete(*, n: int, seed: int) -> Topology:
    """Complete graph: every pair linked; W = J/n averages exactly in one step (gap 1)."""
    return Topology("complete", n, graphs.complete_graph(n))


@TOPOLOGIES.register("ring")
def ring(*, n: int, seed: int) -> Topology:
    """Ring: node i linked to i ± 1 (mod n); weights 1/3, gap ~ 4 pi^2 / (3 n^2).

    References: Lian et al., NeurIPS 2017 (D-PSGD on a ring).
    """
    return Topology("ring", n, graphs.ring_graph(n))


@TOPOLOGIES.register("torus")
def torus(*, n: int, seed: int, rows: PositiveInt | None = None,
          cols: PositiveInt | None = None) -> Topology:
    """2-D torus: periodic rows x cols grid, node r * cols + c, degree 4 (sides >= 3).

    Args:
      rows, cols: grid shape with rows * cols = n. Give one, both or neither; by default the
        most square factorisation of n (a prime n gives a 1 x n ring).
    """
    if rows is None and cols is None:
        rows, cols = graphs.square_shape(n)
    elif rows is None or cols is None:
        key, side = ("rows", rows) if cols is None else ("cols", cols)
        assert side is not None
        if n % side:
            raise ConfigError("torus side does not divide n", key=key, value=side,
                              allowed=f"a divisor of n = {n}")
        rows, cols = (side, n // side) if key == "rows" else (n // side, side)
    elif rows * cols != n:
        raise ConfigError(f"torus shape {rows} x {cols} does not have n = {n} nodes", key="rows",
                          value=rows, allowed=f"rows * cols == {n}")
    return Topology("torus", n, graphs.torus_graph(rows, cols))


@TOPOLOGIES.register("exponential")
def exponential(*, n: int, seed: int) -> Topology:
    """Static exponential graph: node i linked to i ± 2^k (mod n), k = 0..floor(log2(n-1)).

    Degree 2 log2(n) - 1 for n a power of two; gap stays large as n grows.

    References: Ying et al., Exponential Graph is Provably Efficient for Decentralized Deep
    Training, NeurIPS 2021 (undirected version of their static exponential graph).
    """
    return Topology("exponential", n, graphs.exponential_graph(n))


@TOPOLOGIES.register("erdos_renyi")
def erdos_renyi(*, n: int, seed: int, p: Fraction) -> Topology:
    """Erdos-Renyi G(n, p), resampled with successive keyed seeds until connected.

    Args:
      p: edge probability in (0, 1]; connected w.h.p. above ln(n) / n.

    Raises:
      ConfigError (key ``p``) after 100 disconnected samples.
    """
    G = graphs.sample_connected(lambda s: graphs.erdos_renyi_graph(n, p, seed=s), seed, key="p",
                                value=p, hint=f"p well above ln(n)/n = {math.log(max(n, 2)) / n:.4g}")
    return Topology("erdos_renyi", n, G)


@TOPOLOGIES.register("small_world")
def small_world(*, n: int, seed: int, k: Annotated[int, Ge(2)] = 4,
                p: Probability = 0.1) -> Topology:
    """Watts-Strogatz small world, resampled with successive keyed seeds until connected.

    Args:
      k: each node starts linked to its k nearest ring neighbours (even, k < n).
      p: probability of rewiring each edge, in [0, 1].

    References: Watts & Strogatz, Collective dynamics of 'small-world' networks, Nature 1998.
    """
    if k % 2 or k >= n:
        raise ConfigError("small_world k must be even and less than n", key="k", value=k,
                          allowed=f"even, 2 <= k < {n}")
    G = graphs.sample_connected(lambda s: graphs.small_world_graph(n, k, p, seed=s), seed,
                                key="p", value=p, hint="a smaller p or a larger k")
    return Topology("small_world", n, G)


@TOPOLOGIES.register("random_regular")
def random_regular(*, n: int, seed: int, degree: PositiveInt = 4) -> Topology:
    """Uniform random d-regular graph, resampled with successive keyed seeds until connected.

    Args:
      degree: d, with d < n and n * d even; d >= 3 is connected w.h.p., d = 2 rarely for
        large n (use ``ring``), d = 1 only for n = 2.

    References: Bollobas 1980 (configuration model); expanders have a gap bounded away from 0.
    """
    if degree >= n or (n * degree) % 2 or (degree == 1 and n > 2):
        raise ConfigError("impossible connected regular graph", key="degree", value=degree,
                          allowed=f"degree < n = {n}, n * degree even, degree >= 2 if n > 2")
    G = graphs.sample_connected(lambda s: graphs.random_regular_graph(n, degree, seed=s), seed,
                                key="degree", value=degree, hint="degree >= 3")
    return Topology("random_regular", n, G)


@TOPOLOGIES.register("edge_list")
def edge_list(*, n: int, seed: int, path: str) -> Topology:
    """Graph read from a text file of ``u v`` lines (``#`` starts a comment), nodes 0..n-1.

    Args:
      path: the file; every node 0..n-1 must appear in some edge, self loops are rejected,
        repeated edges (either direction) count once.

    Raises:
      ConfigError naming the file and line for a missing file, a bad line or a bad node id.
    """
    return Topology("edge_list", n, graphs.from_edges(n, read_edge_list(path, n)))


def read_edge_list(path: str, n: int) -> list[tuple[int, int]]:
    """Parse `path` into edges; ConfigError(file="path:line", key="path") on any problem."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read edge list: {exc.strerror or exc}", file=str(path),
                          key="path", value=str(path)) from None
    edges: list[tuple[int, int]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if fields:
            edges.append(_parse_edge(fields, n, f"{path}:{lineno}"))
    seen = {v for e in edges for v in e}
    missing = [v for v in range(n) if v not in seen]
    if missing and n > 1:
        raise ConfigError(f"nodes {missing[:5]} appear in no edge", file=str(path), key="path",
                          allowed=f"every node 0..{n - 1} in some edge")
    return edges


def _parse_edge(fields: list[str], n: int, where: str) -> tuple[int, int]:
    try:
        if len(fields) != 2:
            raise ValueError
        u, v = int(fields[0]), int(fields[1])
    except ValueError:
        raise ConfigError("bad edge line", file=where, key="path", value=" ".join(fields),
                          allowed="two integer node ids 'u v'") from None
    for node in (u, v):
        if not 0 <= node < n:
            raise ConfigError("node id out of range", file=where, key="path", value=node,
                              allowed=f"0..{n - 1}")
    if u == v:
        raise ConfigError("self loop", file=where, key="path", value=f"{u} {v}",
                          allowed="an edge between two different nodes")
    return u, v
