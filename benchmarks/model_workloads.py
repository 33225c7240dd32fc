"""W6-W8 (issue 13): shape-identical generated data, and what every implementation shares.

    data: {dataset: benchmarks.model_workloads:generated, form: images, shape: [3, 32, 32], ...}

`generated` is a fedsim dataset plug-in (dotted path): images are float32 normals, token
sequences uniform ids in [0, classes), labels uniform; per-client blocks of
`samples_per_client` rows (the `natural` partition). Speed does not depend on the values.
The plain-PyTorch and vmap baselines (`model_baselines.py`) call `load(workload)` and get the
same arrays, the same model (fedsim's factory: an ordinary nn.Module) and the same settings.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

import numpy as np

from fedsim.data import Dataset

HERE = os.path.dirname(os.path.abspath(__file__))
TEST_SAMPLES = 500


def generated(*, form: Literal["images", "tokens"], shape: list[int], classes: int,
              samples_per_client: int, num_clients: int, seed: int) -> Dataset:
    """Images [n, *shape] float32 or token ids [n, T] int64, labels [n] int64 in [0, classes)."""

    rs = np.random.RandomState(seed)
    n = num_clients * samples_per_client + TEST_SAMPLES
    if form == "images":
        x = rs.standard_normal((n, *shape)).astype(np.float32)
    else:
        x = rs.randint(0, classes, size=(n, *shape)).astype(np.int64)
    y = rs.randint(0, classes, size=n).astype(np.int64)
    m = num_clients * samples_per_client
    split = [np.arange(i * samples_per_client, (i + 1) * samples_per_client) for i in range(num_clients)]
    extra = {}
    if form == "tokens" and "vocab" in {f.name for f in dataclasses.fields(Dataset)}:
        extra["vocab"] = tuple(chr(32 + i) for i in range(classes))  # token ids stay int64
    return Dataset("generated", x[:m], y[:m], x[m:], y[m:], classes, natural_split=split, **extra)


def scenario(workload: str, sets: list[str] | None = None) -> Any:
    from fedsim.config import load_scenario

    return load_scenario(os.path.join(HERE, "scenarios", f"{workload}.yaml"), sets or [])


def load(workload: str, sets: list[str] | None = None) -> dict[str, Any]:
    """Arrays (client-major), the model factory and the FedAvg settings of a W6-W8 scenario
    (with `--set`-style overrides)."""
    from fedsim.models import build_model

    sc = scenario(workload, sets)
    p = sc.data.params()
    ds = generated(num_clients=sc.data.clients, seed=sc.seed, **p)
    part = sc.participation
    per_round = part.params().get("clients_per_round") if part.kind == "uniform" else None
    st = sc.strategy.params()
    return {"x": ds.x_train, "y": ds.y_train, "x_test": ds.x_test, "y_test": ds.y_test,
            "sizes": np.full(sc.data.clients, p["samples_per_client"]),
            "make": lambda: build_model(sc.model.kind, sc.model.params(), input_shape=tuple(p["shape"]),
                                        num_classes=p["classes"]),
            "clients": sc.data.clients, "per_round": per_round or sc.data.clients, "rounds": sc.rounds,
            "steps": st["local_steps"], "batch": sc.strategy.batch_size, "lr": st["lr"],
            "eval_batch": sc.eval.batch_size}


def int_tokens_shim() -> None:
    """Keep generated token ids int64 where fedsim's loader still casts features to float32.

    fedsim's `load_dataset` before the datasets work of issue 12 cast every feature array to
    float32; token ids of generated data are small integers, so casting back is exact. No-op
    once datasets carry a `vocab` (ids stay int64).
    """
    import fedsim.setup as setup

    build = setup.build_setup

    def patched(sc: Any) -> Any:
        s = build(sc)
        ds = s.dataset
        if sc.data.params().get("form") == "tokens" and ds.x_train.dtype.kind == "f":
            s.dataset = dataclasses.replace(ds, x_train=ds.x_train.astype(np.int64),
                                            x_test=ds.x_test.astype(np.int64))
        return s
    setup.build_setup = patched
