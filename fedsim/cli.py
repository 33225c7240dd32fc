"""Command line: ``fedsim run|validate|sweep|list|topology|plot|compare``.

Exit codes: 0 success, 2 bad input (one line naming file, key, value and what is allowed),
1 runtime failure. Heavy libraries (torch, flwr, mpi4py) load only inside the commands that
need them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from fedsim.errors import ConfigError, RunDiverged, RunInterrupted, check_output_file

LISTABLE = ("strategies", "topologies", "datasets", "partitions", "models", "participation",
            "engines", "compressors", "optimizers", "work", "aggregators", "attacks")


def _registry(what: str) -> Any:
    if what == "strategies":
        from strategies import STRATEGIES as r
    elif what == "topologies":
        from topologies import TOPOLOGIES as r
    elif what in ("datasets", "partitions"):
        from fedsim import data
        r = data.DATASETS if what == "datasets" else data.PARTITIONS
    elif what == "models":
        from fedsim.models import MODELS as r
    elif what == "participation":
        from fedsim.participation import PARTICIPATION as r
    elif what == "engines":
        from fedsim.engines import ENGINES as r
    elif what == "optimizers":
        from strategies import OPTIMIZERS as r
    elif what == "work":
        from fedsim.work import WORK as r
    elif what == "aggregators":
        from fedsim.robust import AGGREGATORS as r
    elif what == "attacks":
        from fedsim.attacks import ATTACKS as r
    else:
        from strategies import COMPRESSORS as r
    return r


def cmd_run(args: argparse.Namespace) -> int:
    from fedsim.config import load_scenario
    from fedsim.run import execute

    extra = {"engine": {"kind": args.engine}} if args.engine else None
    sc = load_scenario(args.scenario, args.set, extra=extra)
    path, summary = execute(sc, out_dir=args.out, quiet=args.quiet)
    if path:
        print(path)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from fedsim.config import load_scenario
    from fedsim.run import execute

    folder = os.path.normpath(args.run)
    config = os.path.join(folder, "config.yaml")
    if not os.path.isdir(folder) or not os.path.isfile(config):
        raise ConfigError("not a run folder (no config.yaml)", file=folder,
                          allowed="a folder written by `fedsim run`")
    extra: dict | None = None
    replace: tuple[str, ...] = ()
    if args.engine:  # another engine: its own defaults, the trajectory's dtype and device
        from fedsim.config import read_yaml

        engine = read_yaml(config).get("engine") or {}
        same = engine.get("kind") == args.engine
        kept = engine if same else {k: engine[k] for k in ("dtype", "device") if k in engine}
        extra, replace = {"engine": {**kept, "kind": args.engine}}, ("engine",)
    sc = load_scenario(config, args.set, extra=extra, replace=replace)
    path, _ = execute(sc, quiet=args.quiet, resume=folder)
    if path:
        print(path)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from fedsim.config import load_scenario
    from fedsim.engines import ENGINES
    from fedsim.setup import build_setup
    from fedsim.setup_checks import check_model_fits

    sc = load_scenario(args.scenario, args.set)
    setup = build_setup(sc)  # everything `run` builds except the training:
    check_model_fits(setup)
    ENGINES.build(sc.engine.kind, sc.engine.params()).prepare(setup)  # data placed, engine checks
    print(f"ok: {args.scenario}: {sc.strategy.name} on {sc.data.dataset} "
          f"({setup.num_clients} clients, {setup.model.spec.size} parameters, {sc.rounds} rounds, "
          f"engine {sc.engine.kind})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Each plug-in of a kind: its name, first docstring line, and its keys (type, default)."""
    from fedsim.plugin_doc import param_lines

    reg = _registry(args.what)
    names = reg.names()
    width = max((len(n) for n in names), default=0)
    for n in names:
        print(f"{n:<{width}}  {reg.describe(n)}")
        for line in param_lines(reg, n):
            print(f"{'':<{width}}    {line}")
    return 0


def _kv(items: Sequence[str], flag: str) -> dict[str, Any]:
    import yaml

    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise ConfigError("parameter must look like key=value", key=flag, value=it)
        out[k] = yaml.safe_load(v) if v else ""
    return out


def cmd_topology(args: argparse.Namespace) -> int:
    from fedsim.setup_checks import MemoryEstimate, estimate_graph
    from topologies import build_topology, describe

    params = _kv(args.params, "topology params")
    estimate_graph(args.kind, params, args.nodes, MemoryEstimate(None), key="--nodes")
    try:
        topo = build_topology(args.kind, params, n=args.nodes, seed=args.seed)
    except ConfigError as err:
        raise err.at(prefix="topology") from None
    info = describe(topo, rule=args.mixing)
    for k, v in info.items():
        print(f"{k:<14} {v:.6f}" if isinstance(v, float) else f"{k:<14} {v}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedsim.config import apply_overrides, read_yaml
    from fedsim.sweep import check_section, merge_flags, parse_grid_flags, parse_seeds
    from fedsim.sweep_driver import run_sweep

    raw = read_yaml(args.scenario)
    try:
        raw = apply_overrides(raw, args.set)
        spec = check_section(raw.pop("sweep", None) or {})
    except ConfigError as err:
        raise err.at(file=args.scenario) from None
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("must be >= 1", key="--jobs", value=args.jobs)
    parse_seeds(args.seeds, "--seeds")
    spec = merge_flags(spec, grid=parse_grid_flags(args.grid), seeds=args.seeds, jobs=args.jobs,
                       launcher=args.launcher, submitit=_kv(args.submitit, "--submitit"))
    return run_sweep(raw, spec, args.scenario, out=args.out, dry=args.dry_run, quiet=args.quiet)


def cmd_plot(args: argparse.Namespace) -> int:
    from fedsim.plot import plot_runs

    out = plot_runs(args.runs, x=args.x, y=args.y, output=args.output, band=args.band,
                    title=args.title, logy=True if args.logy else None)
    print(out)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedsim.compare import compare

    if args.output:
        check_output_file(args.output, "-o")
    fmt = args.format or ("csv" if (args.output or "").endswith(".csv") else None)
    text = compare(args.runs, target=args.target, last=args.last, fmt=fmt, baseline=args.baseline)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        print(args.output)
    else:
        print(text)
    return 0


def _add_sweep(sub: Any) -> None:
    s = sub.add_parser("sweep", help="run a scenario over a grid of settings and seeds, one run "
                       "per point in one sweep folder (rerun to resume)")
    s.add_argument("scenario")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="an axis of the grid, e.g. --grid strategy.lr=0.05,0.1 (repeatable)")
    s.add_argument("--seeds", help="seeds, e.g. 0-4 or 0,2,7 (default: sweep.seeds or seed)")
    s.add_argument("--jobs", type=int, help="points at a time (default 1: in this process)")
    s.add_argument("--out", help="the sweep folder (default: sweep.out or <output.dir>/<name>-sweep)")
    s.add_argument("--launcher", choices=("local", "slurm"), help="local processes or a Slurm "
                   "job array through submitit")
    s.add_argument("--submitit", action="append", default=[], metavar="KEY=VALUE",
                   help="submitit executor parameter, e.g. timeout_min=120, slurm_partition=gpu")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the base scenario (repeatable)")
    s.add_argument("--dry-run", action="store_true", help="list and validate the points only")
    s.add_argument("--quiet", action="store_true", help="no line per finished point")
    s.set_defaults(fn=cmd_sweep)


def build_parser() -> argparse.ArgumentParser:
    from fedsim.provenance import DISTRIBUTION, version

    p = argparse.ArgumentParser(prog="fedsim", description="Federated and decentralized training simulator.")
    p.add_argument("--version", action="version",
                   version=f"fedsim {version()} (distribution {DISTRIBUTION})")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a scenario and print its run folder")
    r.add_argument("scenario")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario key, e.g. --set strategy.lr=0.1 (repeatable)")
    r.add_argument("--out", help="parent folder of the run folder (default: output.dir)")
    r.add_argument("--engine", help="engine kind (overrides engine.kind)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(fn=cmd_run)

    rs = sub.add_parser("resume", help="continue a run folder from its latest checkpoint "
                        "(--set rounds=N extends a finished run)")
    rs.add_argument("run")
    rs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    rs.add_argument("--engine", choices=("multiplex", "mpi", "flower"))
    rs.add_argument("--quiet", action="store_true")
    rs.set_defaults(fn=cmd_resume)

    v = sub.add_parser("validate", help="check a scenario (exit 0, or 2 with the reason)")
    v.add_argument("scenario")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(fn=cmd_validate)
    _add_sweep(sub)

    ls = sub.add_parser("list", help="list registered plug-ins")
    ls.add_argument("what", choices=LISTABLE)
    ls.set_defaults(fn=cmd_list)

    t = sub.add_parser("topology", help="describe a topology: edges, degrees, connectivity, spectral gap")
    t.add_argument("kind")
    t.add_argument("--nodes", type=int, required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--mixing", choices=("metropolis", "max_degree"), default="metropolis")
    t.add_argument("params", nargs="*", metavar="KEY=VALUE", help="topology parameters, e.g. degree=4")
    t.set_defaults(fn=cmd_topology)

    pl = sub.add_parser("plot", help="curves of runs and sweeps: mean and band over seeds")
    pl.add_argument("runs", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    pl.add_argument("--x", choices=("round", "bytes", "bytes_up", "wall", "sim", "sim_time"),
                    default="round",
                    help="wall: host seconds; sim_time (or sim): simulated seconds (sim_time_s)")
    pl.add_argument("--y", choices=("test_accuracy", "test_loss", "train_loss", "consensus_distance",
                                    "node_accuracy_mean"), default="test_accuracy")
    pl.add_argument("--band", choices=("std", "ci", "none"), default="std",
                    help="shade mean ± std over seeds (default) or the 95%% t-interval")
    pl.add_argument("--logy", action="store_true", help="log y axis")
    pl.add_argument("--title", help="figure title (default: metric, data and seeds)")
    pl.add_argument("-o", "--output", default=None, help="PNG file (default: plot.png)")
    pl.set_defaults(fn=cmd_plot)

    c = sub.add_parser("compare", help="tables of runs and sweeps: mean ± std and 95%% intervals "
                       "over seeds, paired differences")
    c.add_argument("runs", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    c.add_argument("--target", type=float, help="also rounds to this test accuracy, e.g. 0.8")
    c.add_argument("--last", type=int, default=1, help="final = mean of the last K evaluations")
    c.add_argument("--baseline", help="group label or strategy name the others are paired with "
                   "(default: the first group of each context)")
    c.add_argument("--format", choices=("md", "csv"), help="default: md (per-run table when no "
                   "two runs differ only in seed)")
    c.add_argument("-o", "--output", help="write to this file (.csv: CSV)")
    c.set_defaults(fn=cmd_compare)

    # Flower: run any Flower app on fedsim's runtimes; export a scenario as a Flower app.
    from importlib import import_module

    fr = sub.add_parser("flower-run", help="run an existing Flower app (ServerApp + ClientApp) "
                        "on fedsim's Ray-free runtimes, or on Flower's Ray simulation")
    fr.add_argument("server_app", help="module:attribute of the ServerApp")
    fr.add_argument("client_app", help="module:attribute of the ClientApp")
    fr.add_argument("--nodes", type=int, required=True, help="number of SuperNodes (partitions)")
    fr.add_argument("--runtime", choices=("inprocess", "mpi", "ray"), default="inprocess",
                    help="mpi: launch with mpiexec -n K fedsim flower-run ...")
    fr.add_argument("--seed", type=int, default=0)
    fr.add_argument("--run-config", action="append", default=[], metavar="'k=v k2=v2'",
                    help="context.run_config entries (TOML values), as `flwr run --run-config`")
    fr.add_argument("--app-dir", default=None, help="folder to import the app modules from (default: .)")
    fr.add_argument("--num-cpus", type=int, default=1, help="ray: CPUs per ClientApp")
    fr.add_argument("--num-gpus", type=float, default=0.0, help="ray: GPUs per ClientApp")
    fr.set_defaults(fn=lambda a: import_module("fedsim.flower.cli").cmd_flower_run(a))
    ef = sub.add_parser("export-flower", help="write a Flower app project (flwr run DIR) for a scenario")
    ef.add_argument("scenario")
    ef.add_argument("dir")
    ef.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ef.add_argument("--force", action="store_true", help="overwrite files in an existing DIR")
    ef.set_defaults(fn=lambda a: import_module("fedsim.flower.cli").cmd_export_flower(a))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and getattr(args, "command", None) == "topology" and all("=" in r for r in rest):
        args.params = [*args.params, *rest]  # key=value after --nodes N
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "nodes", 1) is not None and getattr(args, "nodes", 1) < 1:
        print(f"error: --nodes: must be >= 1 (got {args.nodes})", file=sys.stderr)
        return 2
    try:
        return int(args.fn(args) or 0)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        print(f"error: {stop}", file=sys.stderr)
        return stop.code
    except RunDiverged as div:
        print(f"error: {div}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # runtime failure: short message; traceback on request
        if os.environ.get("FEDSIM_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc} (set FEDSIM_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
