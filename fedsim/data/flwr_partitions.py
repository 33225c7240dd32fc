"""Flower Datasets' partitioners as fedsim partition kinds (``partition: {kind: flwr-...}``).

Each kind runs the real ``flwr_datasets.partitioner`` class on a ``datasets.Dataset`` holding
the training labels (and the natural client id of every row) and reads back the row indices
of every partition, so any fedsim dataset (digits, LEAF, npz, hf) can be split exactly as a
Flower app would split it. Flower's partitioners seed their own numpy generator: fedsim passes
a 32-bit seed derived from (seed, PARTITION, "flower"). Needs the ``[hf]`` extra.

Reference: Flower Datasets, https://flower.ai/docs/datasets/ (``IidPartitioner``,
``DirichletPartitioner``, ``PathologicalPartitioner``, ``NaturalIdPartitioner``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from fedsim import rng
from fedsim.data.arrays import owners
from fedsim.errors import ConfigError
from fedsim.partition import PARTITIONS

_ROW, _LABEL, _CLIENT = "row", "label", "client"


def _flower_seed(seed: int) -> int:
    return rng.key(seed, rng.PARTITION, rng.purpose_id("flower")) % (2 ** 32)


def _run(make: Any, labels: np.ndarray, num_clients: int, seed: int,
         natural_split: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Rows of every partition of Flower partitioner `make(module)` over a label table.

    The table's rows are the training rows in a random order keyed by (seed, PARTITION,
    "flower", 1), as Flower's FederatedDataset shuffles before partitioning.
    """
    try:
        import datasets
        from flwr_datasets import partitioner as fp
    except ImportError:
        raise ConfigError("Flower partitioners need flwr-datasets", key="kind",
                          allowed='pip install -e ".[hf]"') from None
    # rows in a keyed random order, as FederatedDataset(shuffle=True) hands them to Flower
    order = rng.np_rng(seed, rng.PARTITION, rng.purpose_id("flower"), 1).permutation(len(labels))
    table = {_ROW: order, _LABEL: labels[order]}
    if natural_split is not None:
        table[_CLIENT] = owners(natural_split, len(labels))[order]
    part = make(fp)
    part.dataset = datasets.Dataset.from_dict(table)
    try:
        return [np.asarray(part.load_partition(i)[_ROW], dtype=np.int64)
                for i in range(num_clients)]
    except ValueError as exc:  # Flower's own checks (e.g. min_partition_size not reachable)
        raise ConfigError(f"Flower partitioner failed: {str(exc).splitlines()[0]}",
                          key="kind", value=type(part).__name__) from None


@PARTITIONS.register("flwr-iid")
def flwr_iid(*, labels: np.ndarray, num_clients: int, seed: int,
             natural_split: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Flower's IidPartitioner: equal shards of the (keyed-shuffled) rows."""
    return _run(lambda fp: fp.IidPartitioner(num_partitions=num_clients), labels, num_clients, seed)


@PARTITIONS.register("flwr-dirichlet")
def flwr_dirichlet(*, alpha: Annotated[float, Field(gt=0)],
                   min_partition_size: Annotated[int, Field(ge=0)] = 10,
                   self_balancing: bool = False, labels: np.ndarray, num_clients: int,
                   seed: int, natural_split: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Flower's DirichletPartitioner (Yurochkin et al. 2019): per-class shares ~ Dir(alpha)."""
    return _run(lambda fp: fp.DirichletPartitioner(
        num_partitions=num_clients, partition_by=_LABEL, alpha=alpha,
        min_partition_size=min_partition_size, self_balancing=self_balancing,
        seed=_flower_seed(seed)), labels, num_clients, seed)


@PARTITIONS.register("flwr-pathological")
def flwr_pathological(*, num_classes_per_partition: Annotated[int, Field(ge=1)] = 2,
                      class_assignment_mode: Literal["random", "deterministic",
                                                     "first-deterministic"] = "random",
                      labels: np.ndarray, num_clients: int, seed: int,
                      natural_split: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Flower's PathologicalPartitioner: each client gets samples of only k classes."""
    return _run(lambda fp: fp.PathologicalPartitioner(
        num_partitions=num_clients, partition_by=_LABEL,
        num_classes_per_partition=num_classes_per_partition,
        class_assignment_mode=class_assignment_mode, seed=_flower_seed(seed)),
        labels, num_clients, seed)


@PARTITIONS.register("flwr-natural")
def flwr_natural(*, labels: np.ndarray, num_clients: int, seed: int,
                 natural_split: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Flower's NaturalIdPartitioner by the dataset's client id (sorted ids, as `natural`)."""
    if natural_split is None:
        raise ConfigError("this dataset defines no natural client ids", value="flwr-natural",
                          allowed="a dataset with clients (leaf, npz with client_id, hf with "
                          "client_column, synthetic, logistic)")
    if num_clients != len(natural_split):
        raise ConfigError(f"the dataset has {len(natural_split)} natural clients",
                          key="clients", value=num_clients, allowed=str(len(natural_split)))
    return _run(lambda fp: fp.NaturalIdPartitioner(partition_by=_CLIENT), labels, num_clients,
                seed, natural_split)
