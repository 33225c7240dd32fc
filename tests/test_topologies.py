"""Topologies: graph invariants, mixing-matrix properties, known spectral numbers, errors.

Known numbers: docs/algorithms.md#gossip-tests.
"""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest

from fedsim.errors import ConfigError
from topologies import (
    MIXING_RULES,
    TOPOLOGIES,
    MixingMatrix,
    build_topology,
    check_mixing,
    describe,
    mixing_matrix,
    spectral_gap,
)

RANDOM = {"erdos_renyi": {"p": 0.3}, "small_world": {"k": 4, "p": 0.3},
          "random_regular": {"degree": 3}}
STATIC = {"star": {}, "complete": {}, "ring": {}, "torus": {}, "exponential": {},
          "edge_list": None, **RANDOM}  # edge_list params come from the `ring_file` fixture
DYNAMIC = {"one_peer_exponential": {}}


def write_edges(path, n, extra=""):
    path.write_text("# a ring\n" + "".join(f"{i} {(i + 1) % n}  # edge\n" for i in range(n)) + extra)
    return str(path)


def build(kind, n, tmp_path, seed=0):
    params = STATIC.get(kind, DYNAMIC.get(kind))
    if kind == "edge_list":
        params = {"path": write_edges(tmp_path / "edges.txt", n)}
    return build_topology(kind, params, n=n, seed=seed)


def test_every_registered_kind_is_tested():
    assert set(TOPOLOGIES.names()) == set(STATIC) | set(DYNAMIC)
    for name in TOPOLOGIES.names():
        assert TOPOLOGIES.describe(name)


@pytest.mark.parametrize("rule", MIXING_RULES)
@pytest.mark.parametrize("n", [12, 16])
@pytest.mark.parametrize("kind", sorted(STATIC))
def test_static_mixing_is_valid(kind, n, rule, tmp_path):
    topo = build(kind, n, tmp_path)
    G, W = topo.graph(), topo.mixing(rule=rule)
    assert topo.static and topo.n == n and sorted(G) == list(range(n)) and not G.is_directed()
    assert nx.number_of_selfloops(G) == 0
    check_mixing(W, G)
    D = W.dense()
    np.testing.assert_allclose(D, D.T, atol=1e-15)
    assert (D >= 0).all()
    np.testing.assert_allclose(D.sum(0), 1, atol=1e-14)
    np.testing.assert_allclose(D.sum(1), 1, atol=1e-14)
    A = nx.to_numpy_array(G, nodelist=range(n)) + np.eye(n)
    assert (D[A == 0] == 0).all()
    assert nx.is_connected(G) and spectral_gap(W) > 0
    assert W.num_edges() == G.number_of_edges()
    assert topo.mixing(rule=rule) is W  # cached


@pytest.mark.parametrize("kind", sorted(STATIC))
def test_seed_reproducibility(kind, tmp_path):
    """Same seed, same graph; another seed, another graph for the random kinds only."""
    def edges(seed):
        return sorted(map(sorted, build(kind, 32, tmp_path, seed).graph().edges()))
    assert edges(3) == edges(3)
    assert (edges(3) != edges(4)) == (kind in RANDOM)


@pytest.mark.parametrize("n, gap", [(4, 0.666667), (8, 0.195262), (16, 0.050747)])
def test_metropolis_ring_gap(n, gap):
    W = build_topology("ring", {}, n=n, seed=0).mixing()
    assert spectral_gap(W) == pytest.approx(gap, abs=1e-6)
    assert spectral_gap(W) == pytest.approx((2 - 2 * math.cos(2 * math.pi / n)) / 3, rel=1e-12)


@pytest.mark.parametrize("rule", MIXING_RULES)
def test_complete_graph_averages_in_one_step(rule):
    W = build_topology("complete", {}, n=7, seed=0).mixing(rule=rule)
    np.testing.assert_allclose(W.dense(), np.full((7, 7), 1 / 7), rtol=1e-14)
    assert spectral_gap(W) == pytest.approx(1.0, abs=1e-12)
    x = np.arange(7.0)
    np.testing.assert_allclose(W.dense() @ x, np.full(7, 3.0), rtol=1e-14)


def test_metropolis_star5():
    W = build_topology("star", {}, n=5, seed=0).mixing().dense()
    np.testing.assert_allclose(W[0], [0.2] * 5, rtol=1e-14)
    np.testing.assert_allclose(np.diag(W)[1:], [0.8] * 4, rtol=1e-14)
    np.testing.assert_allclose(W[1:, 0], [0.2] * 4, rtol=1e-14)
    assert spectral_gap(build_topology("star", {}, n=5, seed=0).mixing()) == pytest.approx(0.2)
    W_max = build_topology("star", {}, n=5, seed=0).mixing(rule="max_degree").dense()
    np.testing.assert_allclose(W_max, W, rtol=1e-14)  # d_max = 4 is every edge's max degree


def test_ring8_three_gossip_steps():
    W = build_topology("ring", {}, n=8, seed=0).mixing().dense()
    x = np.arange(8.0)
    for _ in range(3):
        x = W @ x
    expect = [2.962963, 2.185185, 2.296296, 3.0, 4.0, 4.703704, 4.814815, 4.037037]
    np.testing.assert_allclose(x, expect, atol=1e-6)
    assert x.mean() == pytest.approx(3.5, rel=1e-14)


@pytest.mark.parametrize("rule", MIXING_RULES)
@pytest.mark.parametrize("kind", sorted(STATIC))
def test_mean_preservation_and_contraction(kind, rule, tmp_path):
    W = build(kind, 12, tmp_path).mixing(rule=rule)
    D, gap = W.dense(), spectral_gap(W)
    x = np.random.default_rng(0).normal(size=(12, 3))
    xbar = x.mean(0)
    for _ in range(5):
        y = D @ x
        np.testing.assert_allclose(y.mean(0), xbar, atol=1e-13)
        assert np.linalg.norm(y - xbar) <= (1 - gap) * np.linalg.norm(x - xbar) + 1e-12
        x = y


@pytest.mark.parametrize("rule", MIXING_RULES)
@pytest.mark.parametrize("kind", ["ring", "torus", "star", "erdos_renyi"])
def test_to_torch_matches_dense(kind, rule, tmp_path):
    torch = pytest.importorskip("torch")
    W = build(kind, 16, tmp_path).mixing(rule=rule)
    X = np.random.default_rng(1).normal(size=(16, 5))
    out = (W.to_torch() @ torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(out, W.dense() @ X, rtol=1e-13, atol=1e-14)
    out32 = W.to_torch(dtype=torch.float32) @ torch.from_numpy(X).float()
    np.testing.assert_allclose(out32.numpy(), W.dense() @ X, atol=1e-5)



@pytest.mark.parametrize("n", [2, 3, 8, 12, 16, 33])
def test_exponential_degree(n):
    G = build_topology("exponential", {}, n=n, seed=0).graph()
    offsets = {(s * 2 ** k) % n for k in range(int(math.log2(n - 1)) + 1) for s in (1, -1)} - {0}
    assert {d for _, d in G.degree()} == {len(offsets)}
    if n & (n - 1) == 0 and n > 2:
        assert len(offsets) == 2 * int(math.log2(n)) - 1


@pytest.mark.parametrize("params, shape", [({}, (4, 4)), ({"rows": 3}, (3, 5)),
                                           ({"cols": 3}, (5, 3)), ({"rows": 5, "cols": 3}, (5, 3))])
def test_torus_shape_and_degree(params, shape):
    n = shape[0] * shape[1]
    G = build_topology("torus", params, n=n, seed=0).graph()
    assert {d for _, d in G.degree()} == {4}
    assert G.number_of_edges() == 2 * n
    assert G.has_edge(0, shape[1] - 1) and G.has_edge(0, (shape[0] - 1) * shape[1])


def test_small_sizes():
    for kind in ("star", "complete", "ring", "torus", "exponential", "one_peer_exponential"):
        for n in (1, 2):
            topo = build_topology(kind, {}, n=n, seed=0)
            W = topo.mixing()
            check_mixing(W, topo.graph())
            assert W.num_edges() == n - 1 and spectral_gap(W) == pytest.approx(1.0)
    assert build_topology("torus", {}, n=7, seed=0).graph().number_of_edges() == 7  # 1 x 7 ring


@pytest.mark.parametrize("kind, params, key", [
    ("torus", {"rows": 3, "cols": 3}, "rows"), ("torus", {"rows": 5}, "rows"),
    ("torus", {"cols": 0}, "cols"), ("random_regular", {"degree": 12}, "degree"),
    ("random_regular", {"degree": 3, "extra": 1}, "extra"), ("erdos_renyi", {}, "p"),
    ("erdos_renyi", {"p": 1.5}, "p"), ("erdos_renyi", {"p": 1e-6}, "p"),
    ("small_world", {"k": 3}, "k"), ("small_world", {"p": -0.1}, "p"),
    ("ring", {"n": 4}, "n"), ("edge_list", {}, "path")])
def test_bad_params_raise_config_error(kind, params, key):
    with pytest.raises(ConfigError) as err:
        build_topology(kind, params, n=12, seed=0)
    assert err.value.key == key
    assert err.value.at(prefix="topology").key == f"topology.{key}"


def test_odd_regular_and_unknown_kind():
    with pytest.raises(ConfigError, match="degree"):
        build_topology("random_regular", {"degree": 3}, n=11, seed=0)
    with pytest.raises(ConfigError, match="unknown topolog"):
        build_topology("hypercube_of_doom", {}, n=8, seed=0)
    with pytest.raises(ConfigError):
        build_topology("ring", {}, n=0, seed=0)


def test_edge_list_file(tmp_path):
    extra = "\n   # blank and comment lines\n3 0\n0 3\n"
    topo = build_topology("edge_list", {"path": write_edges(tmp_path / "e.txt", 6, extra)},
                          n=6, seed=0)
    assert topo.graph().number_of_edges() == 7  # ring of 6 plus the chord 0-3, once
    check_mixing(topo.mixing(), topo.graph())


@pytest.mark.parametrize("content, line", [("0 1\n1 x\n", 2), ("0 1\n1 2 0.5\n", 2),
                                           ("0 1\n1 9\n", 2), ("0 -1\n", 1), ("2 2\n", 1)])
def test_edge_list_bad_lines(tmp_path, content, line):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        build_topology("edge_list", {"path": str(path)}, n=4, seed=0)
    assert f"{path}:{line}" in str(err.value)


def test_edge_list_missing_file_and_nodes(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match="nope.txt"):
        build_topology("edge_list", {"path": str(missing)}, n=4, seed=0)
    (tmp_path / "short.txt").write_text("0 1\n1 2\n")
    with pytest.raises(ConfigError, match=r"short\.txt.*\[3\]"):
        build_topology("edge_list", {"path": str(tmp_path / "short.txt")}, n=4, seed=0)


@pytest.mark.parametrize("rule", MIXING_RULES)
@pytest.mark.parametrize("n", [5, 8, 12, 16])
def test_one_peer_exponential(n, rule):
    topo = build_topology("one_peer_exponential", {}, n=n, seed=0)
    period = math.ceil(math.log2(n))
    assert not topo.static
    union = nx.Graph()
    prod = np.eye(n)
    for t in range(period):
        G, W = topo.graph(t), topo.mixing(t, rule)
        assert max(d for _, d in G.degree()) == 1  # a matching: one peer per node
        assert all(u ^ v == 2 ** t for u, v in G.edges())
        check_mixing(W, G)
        assert set(np.round(W.weights, 12)) <= {0.5, 1.0}
        union.add_edges_from(G.edges())
        prod = W.dense() @ prod
        assert topo.mixing(t + period, rule) is W and topo.graph(t + period) is G
    assert nx.is_connected(union)
    if n & (n - 1) == 0:
        np.testing.assert_allclose(prod, np.full((n, n), 1 / n), atol=1e-15)


def test_describe():
    d = describe(build_topology("ring", {}, n=8, seed=0))
    assert d == {"kind": "ring", "nodes": 8, "edges": 8, "degree_min": 2, "degree_max": 2,
                 "connected": True, "spectral_gap": pytest.approx(0.195262, abs=1e-6),
                 "rule": "metropolis"}
    d = describe(build_topology("one_peer_exponential", {}, n=8, seed=0), rule="max_degree",
                 round=1)
    assert d["edges"] == 4 and not d["connected"] and d["spectral_gap"] == pytest.approx(0)


def test_mixing_matrix_accessors():
    W = build_topology("star", {}, n=5, seed=0).mixing()
    assert list(W.neighbors(0)) == [1, 2, 3, 4] and list(W.neighbors(3)) == [0]
    ids, w = W.row(3)
    assert list(ids) == [0, 3] and list(w) == pytest.approx([0.2, 0.8])
    assert W.num_edges() == 4 and W.indptr.dtype == W.indices.dtype == np.int64
    with pytest.raises(ValueError):
        W.weights[0] = 1.0  # read-only


def test_mixing_matrix_rejects_bad_graphs_and_rules():
    with pytest.raises(ValueError, match="0..n-1"):
        mixing_matrix(nx.grid_2d_graph(2, 2))
    with pytest.raises(ValueError, match="undirected"):
        mixing_matrix(nx.DiGraph([(0, 1)]))
    with pytest.raises(ValueError, match="rule"):
        mixing_matrix(nx.path_graph(3), rule="uniform")
    with pytest.raises(ConfigError):
        build_topology("ring", {}, n=4, seed=0).mixing(rule="uniform")


def test_check_mixing_detects_violations():
    G = nx.path_graph(3)
    ok = mixing_matrix(G)
    check_mixing(ok, G)
    def dense_csr(D):
        return MixingMatrix(3, [0, 3, 6, 9], [0, 1, 2] * 3, np.asarray(D).ravel())
    bad = {"negative": [[1.5, -0.5, 0], [-0.5, 1.5, 0], [0, 0, 1]],
           "sums to": [[0.5, 0.5, 0], [0.5, 0.4, 0], [0, 0, 1]],
           "symmetric": [[0.5, 0.5, 0], [0.3, 0.5, 0.2], [0.2, 0, 0.8]],
           "not an edge": [[0.5, 0.25, 0.25], [0.25, 0.75, 0], [0.25, 0, 0.75]]}
    for msg, D in bad.items():
        with pytest.raises(ValueError, match=msg):
            check_mixing(dense_csr(D), G)


def test_sparse_gap_matches_dense_and_torus_formula():
    W = build_topology("random_regular", {"degree": 3}, n=40, seed=0).mixing()
    assert spectral_gap(W, method="sparse") == pytest.approx(spectral_gap(W, method="dense"), abs=1e-8)
    W = build_topology("torus", {"rows": 48}, n=48 * 48, seed=0).mixing()
    assert spectral_gap(W) == pytest.approx(2 * (1 - math.cos(2 * math.pi / 48)) / 5, rel=1e-6)


@pytest.mark.parametrize("kind, params", [("ring", {}), ("torus", {}),
                                          ("random_regular", {"degree": 4})])
def test_large_topologies_are_sparse(kind, params):
    """n = 4096: building the mixing matrix never allocates an n x n array (a dense float64
    one is 134 MB; the peak allocation stays under 10 MB). Build time is measured in
    benchmarks/, never asserted here."""
    import tracemalloc

    topo = build_topology(kind, params, n=4096, seed=0)
    topo.graph()
    tracemalloc.start()
    try:
        W = topo.mixing()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20, f"peak allocation {peak / 2**20:.1f} MB"
    assert W.n == 4096 and W.num_edges() == topo.graph().number_of_edges()
