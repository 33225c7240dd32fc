"""Optional trackers: copies of a run's metrics for TensorBoard and MLflow (off by default).

``metrics.jsonl`` stays the source of truth: a tracker receives each metrics line as the run writes
it and the summary at the end, and a tracker that fails is switched off with a warning, never the
run. Turn them on with ``output: {trackers: [tensorboard, mlflow]}``; install them with
``pip install "fedsim-lab[track]"`` (tensorboard, mlflow-skinny).

- ``tensorboard``: event files in ``<run folder>/tensorboard/``, one scalar per metric with
  step = round (``tensorboard --logdir runs``).
- ``mlflow``: one MLflow run per fedsim run in the tracking store ``$MLFLOW_TRACKING_URI``, else
  the local file store ``<parent>/mlruns`` (parent: ``--out`` or ``output.dir``; for a sweep's
  points, the sweep folder), in experiment ``$MLFLOW_EXPERIMENT_NAME``, else the parent folder's
  name. Params: the resolved scenario (dotted keys); metrics: every numeric metric, step = round;
  status FINISHED or FAILED.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from fedsim.errors import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any]) -> None: ...
    def close(self, summary: dict[str, Any], ok: bool) -> None: ...


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    """Scalars in ``<run folder>/tensorboard`` (the writer opens at the first metrics line)."""

    def __init__(self, run_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._cls, self.dir = SummaryWriter, os.path.join(run_dir, "tensorboard")
        self._w: Any = None

    def log(self, metrics: dict[str, Any]) -> None:
        if self._w is None:
            self._w = self._cls(log_dir=self.dir)
        for k, v in _numeric(metrics).items():
            self._w.add_scalar(k, v, global_step=int(metrics["round"]))

    def close(self, summary: dict[str, Any], ok: bool) -> None:
        if self._w is None:
            self._w = self._cls(log_dir=self.dir)
        self._w.add_text("summary", "```\n" + json.dumps(summary, indent=1, default=str) + "\n```")
        self._w.close()


class MLflow:
    """One MLflow run, written through `MlflowClient` (no global active-run state)."""

    def __init__(self, sc: Any, final_dir: str, parent: str) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from fedsim.config import to_dict
        from fedsim.stats import flatten

        uri = os.environ.get("MLFLOW_TRACKING_URI") or Path(parent, "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:  # the file store is opt-in in MLflow 3
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.path.basename(os.path.abspath(parent))
        run = self.client.create_run(self._experiment(name), run_name=sc.name, tags={
            "fedsim.run_dir": os.path.abspath(final_dir), "fedsim.strategy": sc.strategy.name,
            "fedsim.seed": str(sc.seed)})
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(to_dict(sc)).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another process of a sweep created it first
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def log(self, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(metrics["round"])
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in _numeric(metrics).items()])

    def close(self, summary: dict[str, Any], ok: bool) -> None:
        self.client.set_tag(self.run_id, "fedsim.status", summary.get("status", "?"))
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class Trackers:
    """The run's trackers; a failing one is dropped with a warning (the run goes on)."""

    def __init__(self, items: dict[str, Tracker]) -> None:
        self.items = items

    def _each(self, method: str, *args: Any) -> None:
        for name, t in list(self.items.items()):
            try:
                getattr(t, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops the run
                print(f"warning: tracker {name} failed and is off for this run: "
                      f"{type(exc).__name__}: {exc}", file=sys.stderr)
                del self.items[name]

    def log(self, metrics: dict[str, Any]) -> None:
        self._each("log", metrics)

    def close(self, summary: dict[str, Any], ok: bool) -> None:
        self._each("close", summary, ok)


def check_trackers(sc: Any) -> None:
    """ConfigError when a tracker of ``output.trackers`` misses its package (before anything
    is written)."""
    from importlib.util import find_spec

    for name in sc.output.trackers:
        if find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"the {name} tracker needs its package: pip install "
                              "'fedsim-lab[track]'", key="output.trackers", value=name)


def open_trackers(sc: Any, run_dir: str, final_dir: str, parent: str) -> Trackers:
    """The trackers of ``output.trackers`` for a run being written to `run_dir` (renamed to
    `final_dir` when it ends) under `parent`; ConfigError when a tracker's package is missing."""
    check_trackers(sc)
    items: dict[str, Tracker] = {}
    for name in sc.output.trackers:
        try:
            items[name] = TensorBoard(run_dir) if name == "tensorboard" else \
                MLflow(sc, final_dir, parent)
        except Exception as exc:  # noqa: BLE001 - a tracker never stops the run
            print(f"warning: tracker {name} could not start and is off for this run: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
    return Trackers(items)
