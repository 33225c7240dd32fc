"""The ServerApp of a fedsim scenario, driven by Flower's `Strategy.start`: the adapter
(`fedsim.flower.adapter`) for fedsim strategies, the scenario's own Flower strategy object
(`fedsim.flower.driver`) for `strategy.name: flower`."""

from __future__ import annotations

import os
from typing import Any

from fedsim.flower.client import scenario_text
from fedsim.types import OnEval, Progress


def make_server_app(setup: Any = None, text: str | None = None, *,
                    on_eval: OnEval | None = None, progress: Progress | None = None,
                    timeout: float = 3600.0, done: list | None = None,
                    app_dir: str | None = None, control: Any = None) -> Any:
    """A Flower `ServerApp` running a fedsim scenario.

    With `setup` (and its `text`) the app runs that built scenario (fedsim's Flower engine).
    Without, it reads `context.run_config["scenario"]` (a YAML path) and writes the run
    folder under `run_config["output-dir"]` (an exported app under `flwr run` or a SuperLink);
    relative paths are relative to `app_dir`, the app's folder.
    The finished adapter is appended to `done` (if given); `control` (fedsim strategies only):
    checkpoints and stop signals, as in `fedsim.flower.adapter.run_adapter`.
    """
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        if setup is not None:
            kw = {"control": control} if control is not None else {}
            adapter = run_scenario(grid, setup, text or scenario_text(setup.scenario),
                                   on_eval=on_eval, progress=progress, timeout=timeout, **kw)
        else:
            adapter = _run_from_config(grid, dict(context.run_config), app_dir, timeout)
        if done is not None:
            done.append(adapter)

    return app


def run_scenario(grid: Any, setup: Any, text: str, **kw: Any) -> Any:
    """Run a built scenario on `grid`: `run_adapter` or, for a Flower strategy object,
    `run_flower_strategy` (same keyword arguments); returns the finished strategy."""
    if setup.scenario.strategy.name == "flower":
        from fedsim.flower.driver import run_flower_strategy

        return run_flower_strategy(grid, setup, text, **kw)
    from fedsim.flower.adapter import run_adapter

    return run_adapter(grid, setup, text, **kw)


def _run_from_config(grid: Any, cfg: dict[str, Any], app_dir: str | None, timeout: float) -> Any:
    from fedsim.config import load_scenario
    from fedsim.run import RunWriter, summarize
    from fedsim.setup import build_setup
    from fedsim.setup_checks import check_model_fits

    def located(path: str) -> str:  # the app's config paths are relative to the app folder
        return os.path.join(app_dir, path) if path and app_dir and not os.path.isabs(path) else path

    sc = load_scenario(located(str(cfg["scenario"])))
    setup = build_setup(sc)
    # the export checked its scenario.yaml, but the app runs whatever `scenario` its run config
    # names (`flwr run --run-config`, an edited copy, another fedsim where it is deployed)
    check_model_fits(setup)
    out = located(str(cfg.get("output-dir", "") or ""))
    writer = RunWriter(sc, out) if out else None

    def log(m: dict[str, Any]) -> None:
        if writer is not None:
            writer.log(m)
        _log_metrics(m)
    adapter = run_scenario(grid, setup, scenario_text(sc), on_eval=log, timeout=timeout)
    if writer is not None:
        extra = {"engine": "flower (exported app)", "params": setup.model.spec.size}
        path = writer.close(summarize(sc, writer.history, adapter.history[-1]["wall_s"], extra), True)
        _log_metrics({"run_folder": path})
    return adapter


def _log_metrics(m: dict) -> None:
    import logging

    logging.getLogger("flwr").info("fedsim %s", m)  # Flower's logger: shown in the ServerApp log
