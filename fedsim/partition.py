"""Partitions of a training set over clients, and each client's own test split.

A partition factory takes keyword parameters from the scenario plus the runtime keywords
``labels`` (int64 [n]), ``num_clients``, ``seed`` and ``natural_split``, and returns one sorted
int64 index array per client. Every sample is used at most once and every client gets at least
one sample (`partition` checks both). Randomness is keyed by (seed, ``rng.PARTITION``, ...).

Built in: ``iid``, ``dirichlet``, ``shards``, ``natural`` (here) and Flower Datasets'
partitioners ``flwr-iid``, ``flwr-dirichlet``, ``flwr-pathological``, ``flwr-natural``
(`fedsim.data.flwr_partitions`, with the ``[hf]`` extra). Every kind also takes ``holdout``:
the fraction of each client's samples kept out of training as that client's test split
(`fedsim.data.splits.client_splits`); with ``holdout: 0`` a client that is one of the dataset's
natural clients gets the dataset's own test data for it (LEAF's per-user test files, ``test_fraction``).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import Field, TypeAdapter, ValidationError

from fedsim import rng
from fedsim.errors import ConfigError
from fedsim.registry import Registry, pydantic_to_config_error

if TYPE_CHECKING:
    from fedsim.data import Dataset

SizeSkew = Annotated[float, Field(ge=0)]
Holdout = Annotated[float, Field(ge=0, lt=1)]


class _PartitionRegistry(Registry):
    """Partition plug-ins, each with the common key ``holdout`` (see `fedsim.data.splits`)."""

    def params(self, name: str) -> dict[str, inspect.Parameter]:
        return {**super().params(name), "holdout": inspect.Parameter(
            "holdout", inspect.Parameter.KEYWORD_ONLY, default=0.0, annotation=Holdout)}

    def validate(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        rest = dict(params)
        holdout = rest.pop("holdout", 0.0)
        out = super().validate(name, rest)
        try:
            out["holdout"] = TypeAdapter(Holdout).validate_python(holdout)
        except ValidationError as exc:
            err = pydantic_to_config_error(exc)
            raise ConfigError(err.msg, key="holdout", value=holdout,
                              allowed="a fraction in [0, 1)") from None
        return out

    def build(self, name: str, params: dict[str, Any], **runtime: Any) -> Any:
        """Call the factory (``holdout`` is validated here but applied by `client_splits`)."""
        kwargs = self.validate(name, params)
        kwargs.pop("holdout")
        return self.get(name)(**kwargs, **runtime)


PARTITIONS = _PartitionRegistry("partitions",
                                builtins=("fedsim.partition", "fedsim.data.flwr_partitions"),
                                reserved=("labels", "num_clients", "seed", "natural_split"))


def partition(kind: str, params: dict, ds: Dataset, *, num_clients: int,
              seed: int) -> list[np.ndarray]:
    """Split ``ds.x_train`` over `num_clients` by partition `kind`: checked, sorted int64 arrays.

    With ``holdout`` in `params`, the held-out rows are excluded (see `fedsim.data.splits.client_splits`).
    """
    from fedsim.data.splits import client_splits

    return client_splits(kind, params, ds, num_clients=num_clients, seed=seed).train


def _partition(kind: str, params: dict, ds: Dataset, *, num_clients: int,
               seed: int) -> list[np.ndarray]:
    n = len(ds.y_train)
    if num_clients > n:
        raise ConfigError("needs at least one sample per client", file=ds.source, key="data.clients",
                          value=num_clients, allowed=f"at most {n} (training samples)")
    parts = PARTITIONS.build(kind, params, labels=ds.y_train, num_clients=num_clients,
                             seed=seed, natural_split=ds.natural_split)
    parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    if len(parts) != num_clients:
        raise ConfigError(f"partition {kind!r} gave {len(parts)} clients", key="clients",
                          value=num_clients)
    if min(len(p) for p in parts) < 1:
        raise ConfigError(f"partition {kind!r} left a client without samples", key="clients",
                          value=num_clients)
    flat = np.concatenate(parts)
    if flat.min() < 0 or flat.max() >= n or np.bincount(flat, minlength=n).max() > 1:
        raise ConfigError(f"partition {kind!r} gave out-of-range or repeated sample indices")
    return parts


def label_distribution(y: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Label proportions q[n, c] of each client's samples, float64 [N, C] (empty clients: 0)."""
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    owner = np.repeat(np.arange(len(parts)), sizes)
    labels = y[np.concatenate(parts)] if len(parts) else np.zeros(0, np.int64)
    counts = np.bincount(owner * num_classes + labels, minlength=len(parts) * num_classes)
    counts = counts.reshape(len(parts), num_classes).astype(np.float64)
    return counts / np.maximum(sizes, 1)[:, None]


# ---- helpers ---------------------------------------------------------------------------------

def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers >= 0 summing to `total`, proportional to `weights` (Hamilton's method)."""
    raw = total * weights / weights.sum()
    out = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - out), kind="stable")
    out[order[: total - out.sum()]] += 1
    return out


def _cum_round(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers summing to `total` from floored cumulative shares (as NIID-Bench's cut points).

    A client with an expected count below 1 still gets a sample with probability about that
    count (largest-remainder rounding would starve it in every class).
    """
    bounds = np.floor(np.cumsum(weights) / weights.sum() * total).astype(np.int64)
    bounds[-1] = total
    return np.diff(bounds, prepend=0)


def _target_sizes(n: int, num_clients: int, size_skew: float, seed: int, floor: int) -> np.ndarray:
    """Client sizes summing to n: `floor` each plus a share of the rest proportional to w_n.

    w_n = 1 (size_skew = 0: sizes equal within 1) or w_n ~ LogNormal(0, size_skew), keyed by
    (seed, PARTITION, -1); largest-remainder rounding.
    """
    if n < floor * num_clients:
        raise ConfigError(f"needs at least {floor} sample(s) per client", key="clients",
                          value=num_clients, allowed=f"at most {n // floor} for {n} samples")
    w = np.ones(num_clients) if size_skew == 0 else \
        rng.np_rng(seed, rng.PARTITION, -1).lognormal(0.0, size_skew, num_clients)
    return floor + _largest_remainder(n - floor * num_clients, w)


def _cut(indices: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(indices, np.cumsum(counts)[:-1])


# ---- partitions ------------------------------------------------------------------------------

@PARTITIONS.register("iid")
def iid(*, size_skew: SizeSkew = 0.0, labels: np.ndarray, num_clients: int, seed: int,
        natural_split: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Uniformly random split; sizes equal (+-1) or lognormal-skewed with sigma `size_skew`.

    With size_skew > 0, client n gets 1 + a share of the other n - N samples proportional to
    w_n ~ LogNormal(0, size_skew) (largest-remainder rounding): the total is unchanged and
    every client keeps at least one sample. The permutation uses stream (seed, PARTITION, 0).
    """
    perm = rng.np_rng(seed, rng.PARTITION, 0).permutation(len(labels))
    return _cut(perm, _target_sizes(len(labels), num_clients, size_skew, seed, 1))


@PARTITIONS.register("dirichlet")
def dirichlet(*, alpha: Annotated[float, Field(gt=0)], min_size: Annotated[int, Field(ge=1)] = 1,
              size_skew: SizeSkew = 0.0, scheme: Literal["per_class", "per_client"] = "per_class",
              max_tries: Annotated[int, Field(ge=1)] = 1000, labels: np.ndarray,
              num_clients: int, seed: int,
              natural_split: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Label skew: class proportions from Dirichlet(alpha); small alpha = few labels per client.

    Target sizes s_n follow the `iid` rule with floor `min_size` (equal when size_skew = 0).
    `per_class` (Yurochkin et al. 2019; Wang et al. 2020 FedMA; Li et al. 2022 NIID-Bench): for
    each class c, shares over clients ~ Dir(alpha 1_N) times s_n, with clients already at their
    target masked out (NIID-Bench's balancing rule); the class's shuffled samples are cut at the
    floored cumulative shares. `per_client` (Hsu et al. 2019, arXiv 1909.06335; the FedAU
    reference code): label mixtures q_n ~ Dir(alpha 1_C); class c goes to clients in proportion
    to q_{n,c} s_n. Draw t uses streams (seed, PARTITION, t, c); draws are repeated
    (t = 0, 1, ...) until every client has >= `min_size` samples, else a ConfigError.
    """
    by_class = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
    avail = np.array([len(ix) for ix in by_class], dtype=np.int64)
    target = _target_sizes(len(labels), num_clients, size_skew, seed, min_size).astype(float)
    draw = _dirichlet_per_class if scheme == "per_class" else _dirichlet_per_client
    for t in range(max_tries):
        counts = draw(avail, alpha, target, seed, t)  # [C, N]
        if counts.sum(0).min() >= min_size:
            return _assign(by_class, counts, seed, t)
    raise ConfigError(f"no Dirichlet draw in {max_tries} tries gave every client >= min_size "
                      "samples", key="alpha", value=alpha,
                      allowed="a larger alpha, fewer clients, a smaller min_size or "
                      "size_skew, or scheme: per_client")


def _dirichlet_per_class(avail: np.ndarray, alpha: float, target: np.ndarray, seed: int,
                         t: int) -> np.ndarray:
    sizes = np.zeros(len(target))
    counts = np.zeros((len(avail), len(target)), dtype=np.int64)
    for c, n_c in enumerate(avail):
        share = rng.np_rng(seed, rng.PARTITION, t, c).dirichlet(np.full(len(target), alpha))
        share = share * target * (sizes < target)
        counts[c] = _cum_round(int(n_c), share if share.sum() > 0 else target)
        sizes += counts[c]
    return counts


def _dirichlet_per_client(avail: np.ndarray, alpha: float, target: np.ndarray, seed: int,
                          t: int) -> np.ndarray:
    g = rng.np_rng(seed, rng.PARTITION, t, -1)
    q = np.nan_to_num(g.dirichlet(np.full(len(avail), alpha), len(target))) * target[:, None]
    return np.stack([_cum_round(int(n_c), q[:, c] if q[:, c].sum() > 0 else target)
                     for c, n_c in enumerate(avail)])


def _assign(by_class: list[np.ndarray], counts: np.ndarray, seed: int, t: int) -> list[np.ndarray]:
    """Client n gets counts[c, n] random samples of class c (shuffles keyed (t, c, 1))."""
    idx = np.concatenate([rng.np_rng(seed, rng.PARTITION, t, c, 1).permutation(ix)
                          for c, ix in enumerate(by_class)])
    owner = np.concatenate([np.repeat(np.arange(counts.shape[1]), row) for row in counts])
    return _cut(idx[np.argsort(owner, kind="stable")], counts.sum(0))


@PARTITIONS.register("shards")
def shards(*, classes_per_client: Annotated[int, Field(ge=1)] = 2, labels: np.ndarray,
           num_clients: int, seed: int,
           natural_split: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Pathological non-IID shards (McMahan et al. 2017, arXiv 1602.05629): <= k labels each.

    The samples are sorted by label (shuffled within a label) and cut into
    num_clients * classes_per_client shards; each client gets classes_per_client random shards.
    Unlike a plain cut of the sorted array, shards never straddle two labels: each label gets a
    number of shards proportional to its size (at least one while shards remain), so a client
    holds at most classes_per_client labels. All samples are used when
    num_clients * classes_per_client >= number of labels; otherwise the smallest labels are
    left out.
    """
    g = rng.np_rng(seed, rng.PARTITION, 0)
    classes = int(labels.max()) + 1
    by_class = [g.permutation(np.flatnonzero(labels == c)) for c in range(classes)]
    sizes = np.array([len(ix) for ix in by_class], dtype=np.int64)
    per_label = _shards_per_label(sizes, num_clients * classes_per_client)
    cuts = [s for ix, k in zip(by_class, per_label, strict=True) if k for s in np.array_split(ix, k)]
    order = g.permutation(len(cuts)).reshape(num_clients, classes_per_client)
    return [np.concatenate([cuts[j] for j in row]) for row in order]


def _shards_per_label(sizes: np.ndarray, total: int) -> np.ndarray:
    """Shard counts per label: sum `total`, <= label size, >= 1 for present labels if possible."""
    present = np.flatnonzero(sizes > 0)
    if sizes.sum() < total:
        raise ConfigError("fewer samples than shards", key="classes_per_client",
                          allowed=f"num_clients * classes_per_client <= {int(sizes.sum())}")
    out = np.zeros(len(sizes), dtype=np.int64)
    keep = present[np.argsort(-sizes[present], kind="stable")][:total]
    out[keep] = 1
    while out.sum() < total:  # largest remainder, capped by label size; at most a few passes
        room = np.where(out < sizes, sizes.astype(np.float64), 0.0)
        out += np.minimum(_largest_remainder(total - int(out.sum()), room), sizes - out)
    return out


@PARTITIONS.register("natural")
def natural(*, select: Literal["all", "first", "random"] = "all", labels: np.ndarray,
            num_clients: int, seed: int,
            natural_split: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """The dataset's own clients: LEAF users, FEMNIST writers, a client-id column, generators.

    `select` all: `clients` must equal the number of natural clients; first: the first
    `clients` of them (in id order); random: `clients` of them drawn with stream
    (seed, PARTITION, -5), kept in id order (LEAF's sampled fraction of users).
    """
    if natural_split is None:
        raise ConfigError("this dataset defines no natural split", value="natural",
                          allowed="iid, dirichlet, shards (or a dataset with clients: "
                          "synthetic, logistic, leaf, npz with client_id, hf with client_column)")
    total = len(natural_split)
    if num_clients > total or (select == "all" and num_clients != total):
        raise ConfigError(f"the dataset has {total} natural clients", key="data.clients",
                          value=num_clients, allowed=f"{total}, or fewer with "
                          "data.partition.select: first | random")
    if select == "random":
        pick = np.sort(rng.np_rng(seed, rng.PARTITION, -5).permutation(total)[:num_clients])
    else:
        pick = np.arange(num_clients)
    return [np.asarray(natural_split[k], dtype=np.int64) for k in pick]
