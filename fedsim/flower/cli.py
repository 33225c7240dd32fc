"""`fedsim flower-run` and `fedsim export-flower` (parsers in `fedsim.cli`)."""

from __future__ import annotations

import argparse
import sys

from fedsim.errors import ConfigError


def cmd_flower_run(args: argparse.Namespace) -> int:
    """Run an existing Flower app on fedsim's runtimes; print a one-line summary."""
    from fedsim.flower.runtime import load_app, parse_run_config, run_app

    run_config = parse_run_config(args.run_config)
    server = load_app(args.server_app, "ServerApp", args.app_dir)
    client = load_app(args.client_app, "ClientApp", args.app_dir)
    _check_kind(server, "flwr.serverapp.ServerApp", args.server_app)
    _check_kind(client, "flwr.clientapp.ClientApp", args.client_app)
    info = run_app(server, client, args.nodes, runtime=args.runtime, seed=args.seed,
                   run_config=run_config,
                   client_resources={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus})
    if info.is_root:
        extra = (f" messages={info.messages} bytes_down={info.bytes_down} bytes_up={info.bytes_up}"
                 if info.messages is not None else "")
        print(f"flower-run: runtime={info.runtime} nodes={info.num_nodes} "
              f"wall_s={info.wall_s:.3f}{extra}", file=sys.stderr)
    return 0


def _check_kind(obj: object, cls_path: str, spec: str) -> None:
    import importlib

    mod, _, name = cls_path.rpartition(".")
    cls = getattr(importlib.import_module(mod), name)
    if not isinstance(obj, cls):
        raise ConfigError(f"{spec} is not a {name}", value=type(obj).__name__, allowed=cls_path)


def cmd_export_flower(args: argparse.Namespace) -> int:
    from fedsim.flower.export import export_flower

    print(export_flower(args.scenario, args.dir, args.set, force=args.force))
    return 0
