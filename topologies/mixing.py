"""Mixing (gossip) matrices of undirected graphs, their checks and their spectral gap.

A mixing matrix W [n, n] is symmetric and doubly stochastic, with W_ij > 0 only on edges of the
graph and on the diagonal. One gossip step is ``X <- W @ X`` for node states X [n, P]. The rule
that turns a graph into weights is kept apart from the graph (unlike BlueFog, where the edge
weights of a DiGraph are the matrix), so every topology works with every rule.

Everything is built from the edge list with numpy (CSR), never as a dense n x n array, so
``mixing_matrix`` on a ring or torus of thousands of nodes takes milliseconds.

References:
  Xiao & Boyd, Fast linear iterations for distributed averaging, Systems & Control Letters 2004.
  Boyd, Diaconis, Xiao, Fastest mixing Markov chain on a graph, SIAM Review 2004.
  Koloskova et al., A Unified Theory of Decentralized SGD with Changing Topology and Local
  Updates, ICML 2020 (the spectral gap enters the rates).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np

__all__ = ["MIXING_RULES", "MixingMatrix", "mixing_matrix", "neighbour_mean", "check_mixing",
           "spectral_gap"]

MIXING_RULES = ("metropolis", "max_degree")
_DENSE_EIG_MAX_N = 2000


@dataclass(frozen=True, eq=False)
class MixingMatrix:
    """A sparse n x n mixing matrix in CSR form; each row includes its diagonal (self weight).

    Attributes:
      n: number of nodes.
      indptr: int64 [n + 1], row i is ``indices[indptr[i]:indptr[i+1]]``.
      indices: int64 [nnz], column (neighbour) ids, sorted within each row.
      weights: float64 [nnz], the entries W_ij. Arrays are read-only.
    """

    n: int
    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray

    def __post_init__(self) -> None:
        for name, dtype in (("indptr", np.int64), ("indices", np.int64), ("weights", np.float64)):
            arr = np.array(getattr(self, name), dtype=dtype)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        nnz = self.indices.shape[0]
        if self.indptr.shape != (self.n + 1,) or self.weights.shape != (nnz,) \
                or self.indptr[0] != 0 or self.indptr[-1] != nnz or np.any(np.diff(self.indptr) < 0):
            raise ValueError("malformed CSR arrays for a MixingMatrix")
        if nnz and (self.indices.min() < 0 or self.indices.max() >= self.n):
            raise ValueError(f"column index out of range 0..{self.n - 1}")

    def rows(self) -> np.ndarray:
        """int64 [nnz]: the row id of each stored entry."""
        return np.repeat(np.arange(self.n, dtype=np.int64), np.diff(self.indptr))

    def dense(self) -> np.ndarray:
        """float64 [n, n] dense copy (for small n and tests)."""
        out = np.zeros((self.n, self.n))
        out[self.rows(), self.indices] = self.weights
        return out

    def to_scipy(self) -> Any:
        """``scipy.sparse.csr_matrix`` [n, n]."""
        import scipy.sparse as sp

        return sp.csr_matrix((self.weights, self.indices, self.indptr), shape=(self.n, self.n))

    def to_torch(self, device: Any = None, dtype: Any = None) -> Any:
        """``torch.sparse_csr_tensor`` [n, n] (float64 unless `dtype`), for ``W @ X`` with X [n, P]."""
        import torch

        with warnings.catch_warnings():  # "sparse CSR support is in beta"; CSR checked already
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(
                torch.tensor(self.indptr), torch.tensor(self.indices),
                torch.tensor(self.weights, dtype=dtype or torch.float64),
                size=(self.n, self.n), device=device, check_invariants=False)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [k], weights [k]) of row i, self included: node i's receive weights."""
        s = slice(self.indptr[i], self.indptr[i + 1])
        return self.indices[s], self.weights[s]

    def neighbors(self, i: int) -> np.ndarray:
        """int64 ids of the in-neighbours of node i (stored entries of row i), excluding i."""
        ids, _ = self.row(i)
        return ids[ids != i]

    def num_edges(self) -> int:
        """Number of undirected edges, i.e. off-diagonal stored entries / 2."""
        return int(np.count_nonzero(self.indices != self.rows())) // 2


def _node_count(G: nx.Graph) -> int:
    """n, after checking that the nodes of `G` are exactly 0..n-1 and `G` is undirected."""
    if G.is_directed():
        raise ValueError("mixing matrices are built from undirected graphs")
    n = G.number_of_nodes()
    try:
        nodes = np.fromiter(G.nodes, dtype=np.int64, count=n)
    except (TypeError, ValueError):
        raise ValueError("graph nodes must be the integers 0..n-1") from None
    if not np.array_equal(np.sort(nodes), np.arange(n)):
        raise ValueError(f"graph nodes must be exactly 0..{n - 1}")
    return n


def edge_array(G: nx.Graph) -> np.ndarray:
    """int64 [m, 2] unique undirected edges (u < v) of `G`, self loops dropped."""
    flat = np.fromiter(itertools.chain.from_iterable(G.edges()), dtype=np.int64)
    e = np.sort(flat.reshape(-1, 2), axis=1)
    e = e[e[:, 0] != e[:, 1]]
    return np.unique(e, axis=0) if G.is_multigraph() else e


def mixing_matrix(G: nx.Graph, rule: str = "metropolis") -> MixingMatrix:
    """Symmetric, doubly stochastic mixing matrix of an undirected graph.

    Rules, for an edge (i, j) with degrees d_i, d_j (self loops ignored) and d_max = max degree:
      * ``"metropolis"`` (Metropolis-Hastings): W_ij = 1 / (1 + max(d_i, d_j)).
      * ``"max_degree"``: W_ij = 1 / (1 + d_max), the same weight on every edge.
    In both, W_ii = 1 - sum_{j != i} W_ij >= 1 / (1 + d_i) > 0, so W is also aperiodic. On a ring,
    a torus and a complete graph both rules give ChocoSGD's uniform weights (1/3, 1/5, 1/N).

    Args:
      G: undirected graph with nodes 0..n-1 (edge attributes are ignored).
      rule: one of ``MIXING_RULES``.

    Returns:
      A `MixingMatrix` (CSR, diagonal included). O(n + m) time and memory.

    References:
      Xiao & Boyd 2004 (Metropolis weights); Boyd, Diaconis, Xiao 2004 (max-degree chain).
    """
    if rule not in MIXING_RULES:
        raise ValueError(f"unknown mixing rule {rule!r}; allowed: {', '.join(MIXING_RULES)}")
    n = _node_count(G)
    e = edge_array(G)
    u, v = e[:, 0], e[:, 1]
    deg = np.bincount(e.ravel(), minlength=n)
    if rule == "metropolis":
        w = 1.0 / (1.0 + np.maximum(deg[u], deg[v]))
    else:
        w = np.full(len(u), 1.0 / (1.0 + (deg.max() if n else 0)))
    diag = np.arange(n, dtype=np.int64)
    self_w = 1.0 - np.bincount(np.concatenate([u, v]), np.concatenate([w, w]), minlength=n)
    rows = np.concatenate([u, v, diag])
    cols = np.concatenate([v, u, diag])
    vals = np.concatenate([w, w, self_w])
    order = np.lexsort((cols, rows))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    return MixingMatrix(n, indptr, cols[order], vals[order])


def neighbour_mean(W: MixingMatrix) -> MixingMatrix:
    """Uniform mean over each node's in-neighbours, self excluded, on the support of `W`.

    Row i holds 1 / d_i on every neighbour j != i of i (d_i = number of them) and nothing on
    the diagonal; a node without neighbours gets an empty row (its mixed value is 0, so a
    strategy can tell it received nothing). Not a gossip matrix: rows sum to 1 or 0 and it is
    not symmetric on irregular graphs. Gossip with variance correction (Tian et al. 2024,
    arXiv:2404.04616) averages what a node receives this way.
    """
    rows = W.rows()
    keep = W.indices != rows
    r, c = rows[keep], W.indices[keep]
    deg = np.bincount(r, minlength=W.n)
    indptr = np.concatenate([[0], np.cumsum(deg)])
    return MixingMatrix(W.n, indptr, c, 1.0 / deg[r].astype(np.float64))


def check_mixing(W: MixingMatrix, G: nx.Graph | None = None, atol: float = 1e-12) -> None:
    """Raise ValueError unless W is a valid gossip matrix (for `G`, if given).

    Checks: entries >= -atol; every row and every column sums to 1 within `atol` (doubly
    stochastic); W == W^T within `atol`; and, if `G` is given, n matches and every nonzero
    off-diagonal entry W_ij is an edge (i, j) of `G`.
    """
    if W.weights.size and W.weights.min() < -atol:
        k = int(np.argmin(W.weights))
        raise ValueError(f"negative entry W[{W.rows()[k]}, {W.indices[k]}] = {W.weights[k]:.3g}")
    for axis, ids in (("row", W.rows()), ("column", W.indices)):
        sums = np.bincount(ids, W.weights, minlength=W.n)
        bad = np.flatnonzero(np.abs(sums - 1.0) > atol)
        if bad.size:
            raise ValueError(f"{axis} {bad[0]} sums to {sums[bad[0]]!r}, not 1")
    A = W.to_scipy()
    asym = abs(A - A.T)
    if asym.nnz and asym.max() > atol:
        raise ValueError(f"W is not symmetric (max |W - W^T| = {asym.max():.3g})")
    if G is not None:
        _check_support(W, G)


def _check_support(W: MixingMatrix, G: nx.Graph) -> None:
    if G.number_of_nodes() != W.n:
        raise ValueError(f"W has n = {W.n} but the graph has {G.number_of_nodes()} nodes")
    rows = W.rows()
    off = (rows != W.indices) & (W.weights != 0)
    e = edge_array(G)
    keys = np.concatenate([e[:, 0] * W.n + e[:, 1], e[:, 1] * W.n + e[:, 0]])
    ok = np.isin(rows[off] * W.n + W.indices[off], keys)
    if not ok.all():
        k = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"W[{rows[off][k]}, {W.indices[off][k]}] != 0 but that is not an edge")


def spectral_gap(W: MixingMatrix, method: str = "auto") -> float:
    """Spectral gap rho = 1 - max(|lambda_2(W)|, |lambda_n(W)|), eigenvalues in decreasing order.

    This is ChocoSGD's definition (``epfml/ChocoSGD``, ``pcode/utils/topology.py``): it uses
    |lambda_n| as well, because a Metropolis matrix need not be PSD. Some papers use
    1 - |lambda_2| alone. Consensus contracts as ||W x - xbar|| <= (1 - rho) ||x - xbar||, and rho
    enters the convergence rates of decentralized SGD (Koloskova et al., ICML 2020). rho = 0 iff
    the graph is disconnected (or bipartite-periodic, impossible here since W_ii > 0); a single
    node has rho = 1.

    `method` "auto": dense ``eigvalsh`` for n <= 2000; beyond (or "sparse"),
    ``scipy.sparse.linalg.eigsh`` (Lanczos) on W - J/n, whose cost grows with 1/rho (slow for
    rings of tens of thousands of nodes); "dense" forces the dense path.
    """
    if method not in ("auto", "dense", "sparse"):
        raise ValueError(f"method must be auto, dense or sparse, got {method!r}")
    if W.n <= 1:
        return 1.0
    if method == "dense" or (method == "auto" and W.n <= _DENSE_EIG_MAX_N):
        lam = np.linalg.eigvalsh(W.dense())  # ascending
        return float(max(0.0, 1.0 - max(abs(lam[-2]), abs(lam[0]))))
    return _sparse_gap(W)


def _sparse_gap(W: MixingMatrix) -> float:
    import scipy.sparse.linalg as sla

    A, n = W.to_scipy(), W.n
    # Deflate the consensus direction: W - J/n has the same spectrum with 1 replaced by 0.
    op = sla.LinearOperator((n, n), matvec=lambda x: A @ x - x.mean(), dtype=np.float64)
    v0 = np.cos(np.arange(n, dtype=np.float64))  # fixed start vector: deterministic result
    lam = sla.eigsh(op, k=1, which="LM", tol=1e-10, ncv=min(n - 1, 40), maxiter=50 * n,
                    v0=v0, return_eigenvectors=False)
    return float(max(0.0, 1.0 - abs(lam[0])))
