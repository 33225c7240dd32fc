"""Set-up checks that turn silently wrong runs into bad input (exit 2), and the memory estimate.

* `check_topology`: a server strategy given a topology other than the default ``star`` (the
  setting would be ignored), a gossip strategy on a disconnected static graph (the components
  never agree: consensus is impossible).
* `check_finite_data`: NaN or infinite features in the training or test data.
* `check_model_fits`: a model that does not take the data's inputs or does not output one logit
  per class (one forward pass, after set-up and before any run folder).
* `MemoryEstimate`: bytes the scenario will hold (data, graph, models x clients, client state),
  summed from the scenario *before* each part is allocated, and refused with the key of the
  largest part, the estimate and the machine's memory when they exceed it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fedsim.errors import ConfigError

GIB = 2.0**30
GRAPH_BYTES_PER_ITEM = 400   # networkx: a node or edge costs a few dicts (~0.3-0.5 kB measured)


def machine_memory() -> int:
    """Physical memory of this machine in bytes (0 when unknown: no refusal)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 0


class MemoryEstimate:
    """Running sum of the bytes a scenario needs, checked after each part is added."""

    def __init__(self, source: str | None, limit: int | None = None) -> None:
        self.source = source
        self.limit = machine_memory() if limit is None else limit
        self.parts: dict[str, tuple[float, str]] = {}

    @property
    def total(self) -> float:
        return sum(b for b, _ in self.parts.values())

    def add(self, key: str, nbytes: float, what: str) -> None:
        """Add `nbytes` for scenario key `key` (described by `what`), then `check`."""
        old = self.parts.get(key, (0.0, ""))[0]
        self.parts[key] = (old + float(nbytes), what)
        self.check()

    def check(self) -> None:
        if not self.limit or self.total <= self.limit:
            return
        key, (nbytes, what) = max(self.parts.items(), key=lambda kv: kv[1][0])
        raise ConfigError(f"this needs about {self.total / GIB:.1f} GiB of memory, more than "
                          f"this machine's {self.limit / GIB:.1f} GiB ({what}: {nbytes / GIB:.1f} GiB)",
                          file=self.source, key=key, allowed="a smaller value (or a machine with "
                          "more memory)")


def estimate_inputs(sc: Any, mem: MemoryEstimate) -> None:
    """Data of the generator datasets (rows x dim, float64 while generated, float32 kept) and the
    topology's graph, from the scenario alone."""
    n = sc.data.clients
    params = sc.data.params()
    rows, dim = params.get("samples_per_client"), params.get("dim")
    if isinstance(rows, int) and isinstance(dim, int):
        mem.add("data.clients", 12.0 * n * rows * dim,
                f"{n} clients x {rows} samples x {dim} features")
    estimate_graph(sc.topology.kind, sc.topology.params(), n, mem, key="topology.kind")


def estimate_graph(kind: str, params: dict[str, Any], n: int, mem: MemoryEstimate,
                   key: str = "topology.kind") -> None:
    """The networkx graph of topology `kind` on `n` nodes (nodes + edges, ~0.4 kB each)."""
    degree = {"complete": n - 1, "star": 1, "ring": 2, "torus": 4}.get(kind)
    if degree is None:
        degree = int(params_degree(params, n))
    edges = n * degree / 2.0
    mem.add(key, GRAPH_BYTES_PER_ITEM * (n + edges), f"a {kind} graph on {n} nodes ({edges:.3g} edges)")


def params_degree(params: dict[str, Any], n: int) -> float:
    """Mean degree of a parametrised random graph (erdos_renyi p, small_world k, degree)."""
    if isinstance(params.get("p"), float):
        return params["p"] * (n - 1)
    for k in ("degree", "k"):
        if isinstance(params.get(k), int):
            return float(params[k])
    return float(np.log2(max(n, 2)))  # exponential graphs and others: ~log2 n


def model_size(make: Any) -> int | None:
    """Parameters of the model `make()` builds, counted on the meta device (nothing allocated);
    None when the model cannot be built there."""
    import torch

    try:
        with torch.device("meta"):
            return int(sum(p.numel() for p in make().parameters()))
    except Exception:  # noqa: BLE001 - a model doing real tensor work in __init__: no estimate
        return None


def estimate_model(sc: Any, params: int, elem: int, mem: MemoryEstimate, shape: str = "") -> None:
    """The global model, the stacked chunk (params, gradients, optimizer state, deltas: ~5 x P
    per client of a chunk) and one model per client with independent inits."""
    n = sc.data.clients
    chunk = sc.engine.params().get("chunk_size") or n
    mb = sc.engine.params().get("memory_mb")
    per = 5.0 * params * elem
    stacked = min(chunk * per, max(mb * 2**20, per)) if isinstance(mb, int) else chunk * per
    key = "model.hidden" if "hidden" in sc.model.params() else "model.kind"
    mem.add(key, 2.0 * params * elem + stacked,
            f"a model of {params} parameters{shape}, stacked over {min(chunk, n)} clients")
    if sc.model.init == "independent":
        mem.add("data.clients", float(n) * params * elem, f"{n} independent initial models")


def estimate_clients(sc: Any, strategy: Any, params: int, elem: int, mem: MemoryEstimate) -> None:
    """Per-client strategy state (e.g. SCAFFOLD's control variates), every client eventually."""
    import torch

    n = sc.data.clients
    try:
        state = strategy.init_clients(torch.zeros(params, device="meta"),
                                      torch.zeros(1, dtype=torch.int64, device="meta"))
        per = sum(v.numel() for v in state.values()) * elem
    except Exception:  # noqa: BLE001 - an init that needs real values: assume one model per client
        per = params * elem
    if per:
        mem.add("data.clients", float(n) * per, f"client state of {n} clients ({per} bytes each)")


def check_topology(sc: Any, strategy: Any, topology: Any) -> None:
    """A topology on a server strategy is ignored: refuse it; gossip needs a connected graph."""
    import networkx as nx

    if strategy.comm == "reduce":
        if sc.topology.kind != "star":
            raise ConfigError(f"{sc.strategy.name} aggregates on a server: a topology would be "
                              "ignored", file=sc.source, key="topology.kind", value=sc.topology.kind,
                              allowed="star (the default), or a gossip strategy (gossip, choco, ...)")
        return
    if topology is None or not getattr(topology, "static", False):
        return
    G = topology.graph(0)
    if G.number_of_nodes() > 1 and not nx.is_connected(G):
        parts = nx.number_connected_components(G)
        key = "topology.path" if sc.topology.kind == "edge_list" else "topology.kind"
        raise ConfigError(f"the gossip graph is disconnected ({parts} components): its nodes never "
                          "reach consensus", file=sc.source, key=key,
                          value=sc.topology.params().get("path", sc.topology.kind),
                          allowed="a connected graph (`fedsim topology KIND --nodes N` shows it)")


def check_finite_data(ds: Any, source: str | None) -> None:
    """NaN or infinite float features are bad input (they make every loss NaN)."""
    for key, x in (("x_train", ds.x_train), ("x_test", ds.x_test)):
        if not np.issubdtype(x.dtype, np.floating) or x.size == 0:
            continue
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ConfigError(f"the data has NaN or infinite features ({int(bad.sum())} rows)",
                              file=ds.source or source, key=key if ds.source else "data",
                              value=f"row {row}", allowed="finite numbers")


def check_model_fits(setup: Any) -> None:
    """One forward pass of a fresh model on two training rows of `setup` (a `fedsim.setup.Setup`):
    a model that rejects the data's input shape or does not output one logit per class is bad
    input (named by `model.kind`). Building a scenario never runs the model; `fedsim validate`,
    `fedsim run` / `resume` (every MPI rank), each point of `fedsim sweep`, `fedsim export-flower`
    and the exported ServerApp call this after `build_setup` and before the engine's prepare and
    any run or export folder. Eval mode, no gradients."""
    import torch

    from fedsim.oracle import model_batch

    ds, dtype, sc = setup.dataset, setup.dtype, setup.scenario
    if len(ds.x_train) == 0:
        return
    module = setup.make_module().to(dtype)
    x = model_batch(ds, np.arange(min(2, len(ds.x_train))), dtype)
    module.eval()
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as exc:  # noqa: BLE001 - whatever the user's forward raises
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"the model does not accept the data's inputs of shape {ds.feature_shape}: "
                          f"{type(exc).__name__}: {first}", file=sc.source, key="model.kind",
                          value=sc.model.kind, allowed="a model whose input matches the data") from None
    want = (len(x), ds.num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the model outputs {got} for a batch of {len(x)}; the data has "
                          f"{ds.num_classes} classes", file=sc.source, key="model.kind",
                          value=sc.model.kind, allowed=f"logits of shape [batch, {ds.num_classes}]")
