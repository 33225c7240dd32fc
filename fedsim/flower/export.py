"""`fedsim export-flower SCENARIO.yaml DIR`: a scenario as a Flower app project.

DIR/
  pyproject.toml         [tool.flwr.app.components] serverapp / clientapp, [tool.flwr.app.config]
                         (scenario path, output dir: both relative to DIR, so the folder can be
                         moved or copied anywhere), federation hint (num-supernodes = clients)
  scenario.yaml          the fully resolved scenario (overrides applied, defaults filled)
  fedsim_app/server_app.py, client_app.py   thin modules calling into fedsim
  README.md              how to run it: `flwr run DIR` (simulation), SuperLink + SuperNodes

The exported ServerApp drives `FlowerAdapter` with Flower's `Strategy.start`; every SuperNode
runs the fedsim ClientApp on its `partition-id`. fedsim must be installed where the apps run.
"""

from __future__ import annotations

import os
import re
from typing import Any

from fedsim.errors import ConfigError
from fedsim.flower.internals import FLOWER_VERSION

SERVER = '''"""ServerApp: the fedsim scenario `scenario.yaml` driven by Flower's Strategy.start."""

import os

from fedsim.flower.server import make_server_app

app = make_server_app(app_dir=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
'''

CLIENT = '''"""ClientApp: one SuperNode = one fedsim client (node_config partition-id)."""

from fedsim.flower.client import make_client_app

app = make_client_app()
'''

PYPROJECT = '''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "fedsim scenario '{scenario}' ({strategy}, {clients} clients) as a Flower app"
dependencies = ["flwr[simulation]=={flwr}.*"]  # fedsim: installed where the apps run (see README)

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedsim"

[tool.flwr.app.components]
serverapp = "fedsim_app.server_app:app"
clientapp = "fedsim_app.client_app:app"

[tool.flwr.app.config]
scenario = "scenario.yaml"   # relative paths: to the app folder
output-dir = "runs"          # fedsim run folders; flwr run --run-config "output-dir='/abs/path'"

# Run with as many SuperNodes as the scenario has clients, e.g.
#   flwr run . --federation-config "num-supernodes={clients}" --stream
[tool.fedsim]
num-supernodes = {clients}
'''

README = '''# {name}: fedsim scenario `{scenario}` as a Flower app

Strategy `{strategy}` on {clients} clients, {rounds} rounds. Needs `fedsim` and `flwr=={flwr}.*`.
Relative paths in `[tool.flwr.app.config]` are resolved against this folder, wherever it is.

Simulation (Flower's local SuperLink, Ray backend):

    flwr run . --federation-config "num-supernodes={clients}" --stream

Deployment (one SuperNode per client; partition-id = the client index). Flower 1.42 serves
the Fleet, Control and Runtime APIs of a SuperLink on one HTTP port (`--host`, `--port`, default
127.0.0.1:8000); each SuperNode has its own `--port` for its ClientApp processes:

    flower-superlink --insecure --port 8000
    flower-supernode --insecure --superlink 127.0.0.1:8000 --port 9094 \\
        --node-config "partition-id=0 num-partitions={clients}"
    ... (one per client, each with its own --port)
    flwr run . <your-connection> --stream --run-config "output-dir='/where/to/write/runs'"

with `<your-connection>` a SuperLink connection in `$FLWR_HOME/config.toml`, e.g.

    [superlink.mine]
    address = "127.0.0.1:8000"
    insecure = true

Without network access add `--disable-runtime-dependency-installation` to the SuperLink (by
default it installs the app's dependencies with `uv sync`).

Under `flwr run` the ServerApp runs from the copy of this app that the SuperLink installed
(under `$FLWR_HOME`), so give `output-dir` as an absolute path there.

Metrics (the keys of `fedsim run`'s metrics.jsonl) go to `output-dir` (a fedsim run folder)
and to the ServerApp log. Gossip strategies relay neighbours' payloads through the SuperLink.
'''


def export_flower(scenario_path: str, out_dir: str, overrides: list[str] | None = None,
                  force: bool = False) -> str:
    """Write the Flower app project for a scenario; returns DIR."""
    import yaml

    from fedsim.config import load_scenario, to_dict
    from fedsim.setup import build_setup
    from fedsim.setup_checks import check_model_fits

    sc = load_scenario(scenario_path, overrides or [])
    # fail here, not inside Flower, if the scenario cannot be built or its model does not fit
    # the data (`fedsim validate`'s checks), before anything is written
    check_model_fits(build_setup(sc))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError("export path is a file, not a folder", value=out_dir,
                          allowed="a new or empty folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise ConfigError("export folder is not empty (use --force to write into it)",
                          value=out_dir, allowed="a new or empty folder, or --force")
    os.makedirs(os.path.join(out_dir, "fedsim_app"), exist_ok=True)
    name = re.sub(r"[^a-z0-9-]+", "-", f"fedsim-{sc.name}".lower()).strip("-")
    fields: dict[str, Any] = dict(name=name, scenario=sc.name, strategy=sc.strategy.name,
                                  clients=sc.data.clients, rounds=sc.rounds,
                                  flwr=FLOWER_VERSION)
    files = {"pyproject.toml": PYPROJECT.format(**fields), "README.md": README.format(**fields),
             "scenario.yaml": yaml.safe_dump(to_dict(sc), sort_keys=False),
             "fedsim_app/__init__.py": "", "fedsim_app/server_app.py": SERVER,
             "fedsim_app/client_app.py": CLIENT}
    for rel, text in files.items():
        with open(os.path.join(out_dir, rel), "w", encoding="utf-8") as fh:
            fh.write(text)
    return out_dir
