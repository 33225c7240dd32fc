"""The ServerApp of a fedsim scenario: the adapter strategy driven by Flower's `Strategy.start`."""

from __future__ import annotations

import os
from typing import Any

from fedsim.flower.client import scenario_text
from fedsim.types import OnEval, Progress


def make_server_app(setup: Any = None, text: str | None = None, *,
                    on_eval: OnEval | None = None, progress: Progress | None = None,
                    timeout: float = 3600.0, done: list | None = None,
                    app_dir: str | None = None) -> Any:
    """A Flower `ServerApp` running a fedsim scenario.

    With `setup` (and its `text`) the app runs that built scenario (fedsim's Flower engine).
    Without, it reads `context.run_config["scenario"]` (a YAML path, relative to
    `app_dir`) and writes the run folder under
    `run_config["output-dir"]` (an exported app under `flwr run` or a SuperLink).
    The finished adapter is appended to `done` (if given).
    """
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        from fedsim.flower.adapter import run_adapter

        if setup is not None:
            adapter = run_adapter(grid, setup, text or scenario_text(setup.scenario),
                                  on_eval=on_eval, progress=progress, timeout=timeout)
        else:
            adapter = _run_from_config(grid, dict(context.run_config), app_dir, timeout)
        if done is not None:
            done.append(adapter)

    return app


def _run_from_config(grid: Any, cfg: dict[str, Any], app_dir: str | None, timeout: float) -> Any:
    from fedsim.config import load_scenario
    from fedsim.flower.adapter import run_adapter
    from fedsim.run import RunWriter, summarize
    from fedsim.setup import build_setup

    path = str(cfg["scenario"])
    if not os.path.isabs(path) and app_dir:
        path = os.path.join(app_dir, path)
    sc = load_scenario(path)
    setup = build_setup(sc)
    out = str(cfg.get("output-dir", "") or "")
    writer = RunWriter(sc, out) if out else None
    log = _log_metrics if writer is None else (lambda m: (writer.log(m), _log_metrics(m)))
    adapter = run_adapter(grid, setup, scenario_text(sc), on_eval=log, timeout=timeout)
    if writer is not None:
        extra = {"engine": "flower (exported app)", "params": setup.model.spec.size}
        path = writer.close(summarize(sc, writer.history, adapter.history[-1]["wall_s"], extra), True)
        _log_metrics({"run_folder": path})
    return adapter


def _log_metrics(m: dict) -> None:
    from logging import INFO

    from flwr.supercore import log

    log(INFO, "fedsim %s", m)
