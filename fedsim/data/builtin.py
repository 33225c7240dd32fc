"""Built-in generated and bundled datasets: LEAF Synthetic, a logistic problem, digits.

All randomness is keyed by (seed, ``rng.DATASET``, ...): the generators give the same arrays
on every process. The generators define their own clients (``natural_split``) and keep a
`test_fraction` of each client's samples as that client's test data (``client_test``; the
global test set is the union).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from annotated_types import Ge, Gt, Lt

from fedsim import rng
from fedsim.constraints import NonNegativeFloat, PositiveFloat, PositiveInt
from fedsim.data import DATASETS, Dataset
from fedsim.data.arrays import blocks as row_blocks

HalfOpen = Annotated[float, Ge(0), Lt(1)]


# ---- per-client generators (LEAF synthetic, logistic) ---------------------------------------

def _client_sizes(num_clients: int, mean: int, skew: float, seed: int) -> np.ndarray:
    """Samples per client: `mean` each, or lognormal(-skew^2/2, skew) * mean (mean kept), >= 1."""
    if skew == 0:
        return np.full(num_clients, mean, dtype=np.int64)
    z = rng.np_rng(seed, rng.DATASET, -1).standard_normal(num_clients)
    return np.maximum(1, np.rint(mean * np.exp(skew * z - skew**2 / 2))).astype(np.int64)


def _assemble(name: str, blocks: list[tuple[np.ndarray, np.ndarray]], num_classes: int,
              test_fraction: float) -> Dataset:
    """Split each client's block into train/test: natural split = train blocks, client test =
    test blocks (pooled into the global test set)."""
    n_all = np.array([len(y) for _, y in blocks])
    n_test = np.minimum(np.rint(n_all * test_fraction).astype(np.int64), n_all - 1)
    n_train = n_all - n_test
    split = row_blocks(n_train)
    x_tr = np.concatenate([x[:n] for (x, _), n in zip(blocks, n_train, strict=True)])
    y_tr = np.concatenate([y[:n] for (_, y), n in zip(blocks, n_train, strict=True)])
    x_te = np.concatenate([x[n:] for (x, _), n in zip(blocks, n_train, strict=True)])
    y_te = np.concatenate([y[n:] for (_, y), n in zip(blocks, n_train, strict=True)])
    return Dataset(name, x_tr, y_tr, x_te, y_te, num_classes, split, client_test=row_blocks(n_test))



@DATASETS.register("synthetic")
def synthetic(*, alpha: NonNegativeFloat = 1.0, beta: NonNegativeFloat = 1.0, dim: PositiveInt = 60, classes:
              Annotated[int, Ge(2)] = 10, samples_per_client: PositiveInt = 200,
              size_skew: NonNegativeFloat = 0.0, test_fraction: HalfOpen = 0.2,
              num_clients: int, seed: int) -> Dataset:
    """LEAF Synthetic(alpha, beta): per-client softmax-regression data (FedProx, arXiv 1812.06127).

    Client k (Li et al. 2020, §5.1, and the LEAF/FedProx generator): u_k ~ N(0, alpha),
    B_k ~ N(0, beta) (alpha and beta are used as standard deviations, as in the reference code;
    identical for the usual 0/0.5/1), W_k ~ N(u_k, 1) [dim, classes], b_k ~ N(u_k, 1),
    v_k ~ N(B_k, 1) [dim], x ~ N(v_k, diag(j^-1.2)), y = argmax(W_k^T x + b_k). Features are left
    on their natural O(1) scale, as in LEAF. alpha controls model heterogeneity, beta data
    heterogeneity. Client k draws from its own stream (seed, DATASET, k), so its data do not
    depend on the number of clients.

    Sizes: `samples_per_client` each when `size_skew` = 0, else lognormal with sigma `size_skew`
    and mean `samples_per_client` (LEAF itself uses lognormal(4, 2) + 50). A `test_fraction` of
    each client's samples (rounded, leaving >= 1 for training) is its test data, pooled
    into the global test set.
    The train rows are stored client after client; `natural_split` gives each client's block.
    """
    sizes = _client_sizes(num_clients, samples_per_client, size_skew, seed)
    sd = (np.arange(1, dim + 1, dtype=np.float64) ** -0.6).astype(np.float32)
    blocks = []
    for k, n in enumerate(sizes):
        g = rng.np_rng(seed, rng.DATASET, k)
        u, big_b = g.normal(0.0, alpha), g.normal(0.0, beta)
        w = g.normal(u, 1.0, (dim, classes)).astype(np.float32)
        b = g.normal(u, 1.0, classes).astype(np.float32)
        v = g.normal(big_b, 1.0, dim).astype(np.float32)
        x = g.standard_normal((int(n), dim), dtype=np.float32)
        x *= sd
        x += v
        blocks.append((x, np.argmax(x @ w + b, axis=1).astype(np.int64)))
    return _assemble("synthetic", blocks, classes, test_fraction)


@DATASETS.register("logistic")
def logistic(*, dim: PositiveInt = 20, samples_per_client: PositiveInt = 100,
             noise: Annotated[float, Ge(0), Lt(0.5)] = 0.1, heterogeneity: NonNegativeFloat = 0.0,
             margin: PositiveFloat = 4.0, size_skew: NonNegativeFloat = 0.0,
             test_fraction: HalfOpen = 0.2, num_clients: int, seed: int) -> Dataset:
    """Convex binary logistic regression with a planted model (labels {0,1}, 2 classes).

    Generator: w* ~ N(0, I) rescaled to norm `margin` (stream (seed, DATASET, -2)). Client k
    (stream (seed, DATASET, k)): w_k = w* + heterogeneity * margin * e_k / sqrt(dim),
    e_k ~ N(0, I) (concept shift), mean m_k = heterogeneity * N(0, I) (covariate shift),
    x ~ N(m_k, I), y = 1[x . w_k > 0], flipped with probability `noise`. With heterogeneity 0
    the clients are i.i.d. and the Bayes classifier is sign(x . w*); noise > 0 keeps the
    logistic-loss optimum finite (the classes are not separable). Sizes and the train/test
    split as for `synthetic`; `natural_split` gives each client's block.
    """
    sizes = _client_sizes(num_clients, samples_per_client, size_skew, seed)
    w_star = rng.np_rng(seed, rng.DATASET, -2).standard_normal(dim)
    w_star *= margin / np.linalg.norm(w_star)
    blocks = []
    for k, n in enumerate(sizes):
        g = rng.np_rng(seed, rng.DATASET, k)
        w = w_star + heterogeneity * margin / np.sqrt(dim) * g.standard_normal(dim)
        mean = heterogeneity * g.standard_normal(dim)
        x = (mean + g.standard_normal((int(n), dim))).astype(np.float32)
        y = (x @ w > 0) ^ (g.random(int(n)) < noise)
        blocks.append((x, y.astype(np.int64)))
    return _assemble("logistic", blocks, 2, test_fraction)


# ---- real data on disk ---------------------------------------------------------------------

def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits table shipped inside scikit-learn (data/digits.csv.gz), read directly.

    Reading the file avoids importing scikit-learn itself (about a second of start-up);
    it falls back to `sklearn.datasets.load_digits` if the file layout ever changes.
    """
    import importlib.util
    import os

    spec = importlib.util.find_spec("sklearn")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(base, "datasets", "data", "digits.csv.gz")
        if os.path.exists(path):
            table = np.loadtxt(path, delimiter=",", dtype=np.float64)
            return table[:, :-1], table[:, -1]
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


@DATASETS.register("digits")
def digits(*, flatten: bool = True, test_fraction: Annotated[float, Gt(0), Lt(1)] = 0.2,
           num_clients: int, seed: int) -> Dataset:
    """scikit-learn's bundled handwritten digits (UCI, 1797 8x8 images, 10 classes), in [0, 1].

    Features are pixel / 16 (64 floats, or [n, 1, 8, 8] images when `flatten` is false).
    The train/test split is a permutation keyed by (seed, DATASET, 0).
    """
    data, target = _sklearn_digits()
    x = (data / 16.0).astype(np.float32)
    if not flatten:
        x = x.reshape(-1, 1, 8, 8)
    y = target.astype(np.int64)
    perm = rng.np_rng(seed, rng.DATASET, 0).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return Dataset("digits", x[tr], y[tr], x[te], y[te], 10)
