"""Communication topologies for decentralized training: graphs, mixing matrices, spectral gap.

``build_topology(kind, params, n=..., seed=...)`` returns a `Topology`; ``topo.graph(round)`` is an
undirected ``nx.Graph`` on nodes 0..n-1 and ``topo.mixing(round, rule)`` its cached
`MixingMatrix` (symmetric, doubly stochastic, CSR). Built-in kinds live in
`topologies.generators` (static) and `topologies.dynamic` (time-varying); plug-ins register
with ``@TOPOLOGIES.register("name")`` or through the ``fedsim.topologies`` entry-point group.
"""

from topologies.base import TOPOLOGIES, Topology, build_topology, describe
from topologies.mixing import (
                               MIXING_RULES,
                               MixingMatrix,
                               check_mixing,
                               mixing_matrix,
                               neighbour_mean,
                               spectral_gap,
)

__all__ = ["TOPOLOGIES", "Topology", "build_topology", "describe", "MIXING_RULES",
           "MixingMatrix", "mixing_matrix", "neighbour_mean", "check_mixing", "spectral_gap"]
