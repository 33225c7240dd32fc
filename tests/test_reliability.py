"""Reliability and security (issue 18): path traversal, unchecked plug-in code, resource bombs,
divergence, a full disk, failing Flower clients, concurrent runs, export into a user's folder."""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from fedsim import run as run_mod
from fedsim import run_checks, setup_checks
from fedsim.config import load_scenario, parse_scenario
from tests.conftest import ROOT, read_metrics, run_cli, small_scenario, write_scenario
from tests.reliability_plugins import MARK, FailsInTraining

BIN = Path(sys.executable).parent


def _strict_json(text: str):
    """json.loads refusing NaN / Infinity tokens (what most JSON parsers do)."""
    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def _one_line_error(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---- security: names, dotted paths, bombs, memory -------------------------------------------

@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs-escaped", "a/b", "..", ".", ""])
@pytest.mark.parametrize("command", ["run", "validate"])
def test_name_must_be_one_path_component(tmp_path, capsys, name, command):
    path = write_scenario(tmp_path / "", small_scenario(rounds=1))
    out = tmp_path / "deep" / "er" / "runs"
    args = [command, path, "--set", f"name={json.dumps(name)}"]
    code, _, err = run_cli(args + (["--out", str(out), "--quiet"] if command == "run" else []), capsys)
    assert code == 2
    assert "name" in _one_line_error(err) and "one path component" in err
    assert not out.exists() and not (tmp_path / "deep" / "escaped").exists()


def test_a_name_with_dots_and_signs_inside_is_fine(tmp_path, capsys):
    path = write_scenario(tmp_path, small_scenario(rounds=1, name="lr=0.1,mu=1e-3_v2.b"))
    code, out, err = run_cli(["run", path, "--out", str(tmp_path / "runs"), "--quiet"], capsys)
    assert code == 0, err
    assert Path(out.strip()).parent == tmp_path / "runs"


@pytest.mark.parametrize("section,path", [
    ("strategy", "os:system"), ("model", "os:system"), ("strategy", "subprocess:call"),
    ("strategy", "tests.reliability_plugins:unannotated"),
    ("strategy", "tests.reliability_plugins:annotated_wrong"),
    ("model", "tests.reliability_plugins:NotAModule"),
    ("data", "tests.reliability_plugins:unannotated"),
    ("topology", "tests.reliability_plugins:unannotated"),
])
@pytest.mark.parametrize("command", ["run", "validate"])
def test_dotted_path_is_checked_before_anything_is_called(tmp_path, capsys, monkeypatch, section,
                                                          path, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    key = {"strategy": "name", "model": "kind", "data": "dataset", "topology": "kind"}[section]
    over = {section: {key: path, **({"command": f"touch {MARK}"} if path.startswith(("os", "sub"))
                                    else {})}}
    if section == "topology":
        over["strategy"] = {"name": "gossip", "lr": 0.1}
        over["participation"] = {"kind": "full"}
    scen = write_scenario(tmp_path, small_scenario(rounds=1, **over))
    code, _, err = run_cli([command, scen] + (["--quiet"] if command == "run" else []), capsys)
    assert code == 2, err
    assert f"{section}.{key}" in _one_line_error(err) and path in err
    assert "annotated" in err or "subclass" in err
    assert not (tmp_path / MARK).exists(), "unchecked plug-in code ran"
    assert not (tmp_path / "runs").exists()


def test_factory_that_lies_about_its_type_is_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    scen = write_scenario(tmp_path, small_scenario(strategy={"name": "tests.reliability_plugins:lying"}))
    code, _, err = run_cli(["validate", scen], capsys)
    assert code == 2 and "not a fedsim.types.Strategy" in _one_line_error(err)


def test_user_plugins_that_declare_the_contract_still_work(tmp_path):
    """The contract check keeps the documented user plug-ins: an annotated factory, a model class."""
    body = small_scenario(strategy={"name": "examples.my_strategy:factory"},
                          model={"kind": "tests.fixtures.models:TwoLayer"})
    sc = parse_scenario(body)
    assert sc.strategy.name == "examples.my_strategy:factory"


@pytest.mark.parametrize("text,needle", [
    ("raise RuntimeError('import-time failure')\n", "RuntimeError: import-time failure"),
    ("def broken(:\n", "SyntaxError"),
])
def test_dotted_module_failing_at_import_is_bad_input(tmp_path, capsys, monkeypatch, text, needle):
    (tmp_path / "userplug.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "userplug", raising=False)
    scen = write_scenario(tmp_path, small_scenario(strategy={"name": "userplug:factory"}))
    code, _, err = run_cli(["validate", scen], capsys)
    assert code == 2 and needle in _one_line_error(err) and "strategy.name" in err


def _alias_bomb(levels: int = 9, width: int = 10) -> str:
    lines = ['a0: &a0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + f"\nname: *a{levels}\n"


def test_yaml_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb())
    t0 = time.process_time()
    code, _, err = run_cli(["validate", str(path)], capsys)
    assert code == 2 and "expands to too many values" in _one_line_error(err)
    assert len(err) < 400
    assert time.process_time() - t0 < 20  # generous: the bomb would take minutes and GiBs


def test_small_aliases_are_still_fine(tmp_path, capsys):
    body = yaml.safe_dump(small_scenario(rounds=1))
    path = tmp_path / "alias.yaml"
    path.write_text("defaults: &lr 0.1\n" + body.replace("lr: 0.1", "lr: *lr"))
    raw = yaml.safe_load(path.read_text())
    raw.pop("defaults")
    path.write_text(yaml.safe_dump(raw))  # the alias itself is no top-level key of a scenario
    code, _, err = run_cli(["validate", str(path)], capsys)
    assert code == 0, err


def test_huge_scenario_file_is_refused_before_parsing(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    with open(path, "w") as fh:
        fh.write("rounds: 1\nsystem:\n  speed: [")
        fh.write("1.0e10, " * (9 * 2**20 // 8))
        fh.write("1.0e10]\n")
    code, _, err = run_cli(["validate", str(path)], capsys)
    assert code == 2 and "too large" in _one_line_error(err) and "huge.yaml" in err


def test_huge_value_in_an_error_is_cut(tmp_path, capsys):
    path = write_scenario(tmp_path, small_scenario(name=["x"] * 5000))
    code, _, err = run_cli(["validate", path], capsys)
    assert code == 2 and len(_one_line_error(err)) < 600 and "5000 items" in err


@pytest.mark.parametrize("over,key", [
    ({"data": {"clients": 10**7, "samples_per_client": 30}}, "data.clients"),
    ({"model": {"kind": "mlp", "hidden": [10**10]}}, "model.hidden"),
    ({"model": {"kind": "mlp", "hidden": [10**5, 10**5]}}, "model.hidden"),
])
def test_memory_estimate_refuses_before_allocating(tmp_path, capsys, monkeypatch, over, key):
    monkeypatch.setattr(setup_checks, "machine_memory", lambda: 8 * 2**30)
    body = small_scenario(**over)
    body["participation"] = {"kind": "full"}
    path = write_scenario(tmp_path, body)
    code, _, err = run_cli(["run", path, "--out", str(tmp_path / "runs"), "--quiet"], capsys)
    assert code == 2, err
    assert "GiB of memory" in _one_line_error(err) and "this machine's 8.0 GiB" in err
    assert f"{key}:" in err
    assert not (tmp_path / "runs").exists()


def test_memory_estimate_counts_client_state():
    """SCAFFOLD keeps a control variate (P values) per client, FedAvg nothing: hand-computed."""
    sc = load_scenario_dict(small_scenario(strategy={"name": "scaffold"}, data={"clients": 1000}))
    from fedsim.setup import build_setup

    setup = build_setup(sc)
    p = setup.model.spec.size
    mem = setup_checks.MemoryEstimate(None, limit=0)
    setup_checks.estimate_clients(sc, setup.strategy, p, 8, mem)
    assert mem.parts["data.clients"][0] == pytest.approx(1000 * p * 8)
    fedavg = build_setup(load_scenario_dict(small_scenario(data={"clients": 1000})))
    mem2 = setup_checks.MemoryEstimate(None, limit=0)
    setup_checks.estimate_clients(sc, fedavg.strategy, p, 8, mem2)
    assert mem2.total == 0


def load_scenario_dict(body):
    return parse_scenario(body)


@pytest.mark.parametrize("kind,nodes", [("ring", 100_000_000), ("complete", 200_000)])
def test_topology_command_refuses_graphs_that_do_not_fit(capsys, monkeypatch, kind, nodes):
    monkeypatch.setattr(setup_checks, "machine_memory", lambda: 16 * 2**30)
    code, _, err = run_cli(["topology", kind, "--nodes", str(nodes)], capsys)
    assert code == 2 and "--nodes" in _one_line_error(err) and "GiB of memory" in err


def test_eta_warning_once_for_a_run_of_days():
    now = [0.0]
    lines: list[str] = []

    class Stream:
        def write(self, s):
            lines.append(s)

        def flush(self):
            pass
    eta = run_checks.EtaWarning(10**6, clock=lambda: now[0], stream=Stream())  # type: ignore[arg-type]
    for _ in range(5):
        now[0] += 1.0
        eta.round_done()
    text = "".join(lines)
    assert text.count("warning:") == 1 and "11.6 days" in text  # (10**6 - 2) s


def test_no_eta_warning_for_a_short_run():
    now = [0.0]
    eta = run_checks.EtaWarning(1000, clock=lambda: now[0])
    for _ in range(3):
        now[0] += 1.0
        eta.round_done()
    assert eta.warned is None


def test_eta_warning_reaches_stderr_of_a_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_mod, "EtaWarning", lambda rounds: run_checks.EtaWarning(rounds, limit_s=0.0))
    path = write_scenario(tmp_path, small_scenario(rounds=3))
    code, _, err = run_cli(["run", path, "--out", str(tmp_path / "runs"), "--quiet"], capsys)
    assert code == 0 and err.count("warning:") == 1 and "3 rounds" in err


# ---- silent wrong results: divergence --------------------------------------------------------

def test_divergence_stops_with_status_diverged_and_strict_json(tmp_path, capsys, monkeypatch):
    """Losses that become NaN (the explosion threshold switched off to reach them)."""
    monkeypatch.setattr(run_checks, "EXPLODED", float("inf"))
    body = small_scenario(rounds=20, strategy={"lr": 1.0e6})
    body["engine"] = {"kind": "multiplex", "dtype": "float32"}
    path = write_scenario(tmp_path, body)
    code, out, err = run_cli(["run", path, "--out", str(tmp_path / "runs"), "--quiet"], capsys)
    assert code == 1 and out == ""
    assert "diverged at round" in _one_line_error(err) and "strategy.lr" in err
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.endswith(".partial")
    lines = [_strict_json(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    summary = _strict_json((folder / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert summary["diverged_round"] == lines[-1]["round"] < 20
    assert lines[-1]["train_loss"] is None or lines[-1]["test_loss"] is None
    assert all(ln["train_loss"] is not None for ln in lines[:-1])


def test_exploded_but_finite_loss_is_divergence(tmp_path, capsys):
    """lr 1e6 with ReLU units: the losses explode but stay finite (the quickstart ends at test
    loss ~2e5, accuracy at chance) -- still a diverged run, not status ok."""
    body = small_scenario(rounds=6, strategy={"lr": 1.0e6})
    path = write_scenario(tmp_path, body)
    code, _, err = run_cli(["run", path, "--out", str(tmp_path / "runs"), "--quiet"], capsys)
    assert code == 1 and "diverged at round" in _one_line_error(err) and "test_loss" in err
    (folder,) = (tmp_path / "runs").iterdir()
    assert _strict_json((folder / "summary.json").read_text())["status"] == "diverged"


def test_divergence_threshold_is_relative_to_a_uniform_guess():
    import math

    limit = run_checks.EXPLODED * math.log(10)
    run_checks.check_finite({"round": 3, "train_loss": 1e9, "test_loss": limit * 0.99}, 10)
    with pytest.raises(run_checks.Diverged) as info:
        run_checks.check_finite({"round": 3, "train_loss": 1.0, "test_loss": limit * 1.01}, 10)
    assert info.value.round == 3 and info.value.keys == ["test_loss"]
    with pytest.raises(run_checks.Diverged):
        run_checks.check_finite({"round": 1, "train_loss": float("nan"), "test_loss": None}, 10)
    run_checks.check_finite({"round": 1, "train_loss": 2.0, "test_loss": None}, 10)


def test_json_safe_turns_non_finite_floats_into_null():
    obj = {"a": float("nan"), "b": [1.0, float("inf"), -float("inf")], "c": {"d": 2}, "e": "nan"}
    assert run_checks.json_safe(obj) == {"a": None, "b": [1.0, None, None], "c": {"d": 2}, "e": "nan"}
    assert run_checks.non_finite({"train_loss": float("nan"), "test_loss": 1.0}) == ["train_loss"]


# ---- faults -----------------------------------------------------------------------------------

def test_short_write_keeps_whole_lines_and_names_the_file(tmp_path, monkeypatch):
    sc = load_scenario(write_scenario(tmp_path, small_scenario()))
    writer = run_mod.RunWriter(sc, str(tmp_path / "runs"))
    writer.log({"round": 1, "train_loss": 1.0})
    real = os.write

    def short(fd, data):
        return real(fd, data[: len(data) // 2])
    monkeypatch.setattr(run_mod.os, "write", short)
    with pytest.raises(OSError) as info:
        writer.log({"round": 2, "train_loss": 0.5})
    assert info.value.errno == errno.ENOSPC and writer.metrics_path in str(info.value)
    monkeypatch.setattr(run_mod.os, "write", real)
    text = Path(writer.metrics_path).read_text()
    assert text.endswith("\n") and [json.loads(x)["round"] for x in text.splitlines()] == [1]
    assert len(writer.history) == 1


def test_disk_full_in_a_real_process_marks_the_run_failed(tmp_path):
    """A file-size limit (as a full disk does) stops the metrics file mid-run: exit 1 naming the
    file, whole lines only, the folder stays .partial and its summary says failed."""
    path = write_scenario(tmp_path, small_scenario(rounds=60, checkpoint={"every": 0}))
    out = tmp_path / "runs"
    limit = 5000  # config.yaml and summary.json fit; 60 metrics lines (~230 bytes each) do not

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    res = subprocess.run([str(BIN / "fedsim"), "run", path, "--out", str(out), "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, preexec_fn=cap, timeout=300)
    assert res.returncode == 1, res.stderr
    assert res.stderr.count("\n") == 1 and "metrics.jsonl" in res.stderr, res.stderr
    (folder,) = out.iterdir()
    assert folder.name.endswith(".partial")
    text = (folder / "metrics.jsonl").read_text()
    assert text.endswith("\n") and 0 < len(text) <= limit
    rounds = [json.loads(ln)["round"] for ln in text.splitlines()]
    assert rounds == list(range(1, len(rounds) + 1)) and len(rounds) < 60
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "failed" and "metrics.jsonl" in summary["error"]


def test_checkpoint_write_failure_in_a_real_process_names_the_file(tmp_path):
    """A file-size limit (as a full disk does) that the metrics lines fit but the model checkpoint
    (18186 float64 parameters, ~145 kB) does not: exit 1 with one line naming the checkpoint file
    and the system's reason (not torch's "unexpected pos"), the folder stays .partial, its summary
    says failed, no half-written file and no `latest` pointer to a missing checkpoint."""
    path = write_scenario(tmp_path, small_scenario(rounds=4, model={"hidden": [256]},
                                                   checkpoint={"every": 1}))
    out = tmp_path / "runs"
    limit = 20_000

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    res = subprocess.run([str(BIN / "fedsim"), "run", path, "--out", str(out), "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, preexec_fn=cap, timeout=300)
    assert res.returncode == 1, res.stderr
    err = _one_line_error(res.stderr)
    (folder,) = out.iterdir()
    staged = folder / "checkpoint" / "round-00000001.tmp" / "state.pt"
    assert f"cannot write {staged}: File too large" in err and "[Errno 27]" in err, err
    assert "enforce fail" not in err and "unexpected pos" not in err
    assert folder.name.endswith(".partial")
    assert not (folder / "checkpoint" / "latest").exists()
    # the staging folder may stay (it is not a checkpoint); no partly written file does
    assert all(p.is_dir() for p in folder.rglob("*.tmp")), list(folder.rglob("*"))
    assert [json.loads(ln)["round"] for ln in (folder / "metrics.jsonl").read_text().splitlines()] == [1]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "failed" and f"cannot write {staged}" in summary["error"]


def test_a_failed_checkpoint_keeps_the_previous_one_resumable(tmp_path, capsys, monkeypatch):
    """The second checkpoint's write fails as torch reports a full disk (its RuntimeError raised
    while handling the OSError): one line naming the file with the system's reason; `latest`
    still names the first checkpoint, and `fedsim resume` finishes the run from it."""
    from fedsim import checkpoint as ckpt

    real, calls = ckpt.torch.save, []

    def full_disk(obj, fh, *args, **kwargs):
        calls.append(fh.name)
        if os.path.basename(fh.name) == ".state.pt.tmp" and len(calls) > 2:
            fh.write(b"half")
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:  # raised while handling it, as torch does: chained as __context__
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")  # noqa: B904
        return real(obj, fh, *args, **kwargs)
    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    path = write_scenario(tmp_path, small_scenario(rounds=3, checkpoint={"every": 1}))
    code, _, err = run_cli(["run", path, "--out", str(tmp_path / "runs"), "--quiet"], capsys)
    assert code == 1
    (folder,) = (tmp_path / "runs").iterdir()
    staged = folder / "checkpoint" / "round-00000002.tmp" / "state.pt"
    assert f"[Errno {errno.ENOSPC}] cannot write {staged}: No space left on device" in _one_line_error(err)
    assert (folder / "checkpoint" / "latest").read_text() == "round-00000001\n"
    assert not (staged.parent / ".state.pt.tmp").exists()
    assert json.loads((folder / "summary.json").read_text())["status"] == "failed"
    monkeypatch.setattr(ckpt.torch, "save", real)
    code, out, err = run_cli(["resume", str(folder), "--quiet"], capsys)
    assert code == 0, err
    done = Path(out.strip())
    assert [m["round"] for m in read_metrics(str(done))] == [1, 2, 3]
    assert json.loads((done / "summary.json").read_text())["status"] == "ok"


def test_checkpoint_write_errors_name_the_file(tmp_path, monkeypatch):
    """torch's own error without a system cause keeps its first line; publishing a checkpoint
    whose `latest` cannot be replaced names `latest`; no temporary file stays behind."""
    from fedsim import checkpoint as ckpt

    def torn(obj, fh, *args, **kwargs):
        fh.write(b"half")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0\nsecond line")
    monkeypatch.setattr(ckpt.torch, "save", torn)
    with pytest.raises(OSError) as info:
        ckpt.write_part(str(tmp_path), 4, "state.pt", {"round": 4})
    staged = Path(ckpt.staging(str(tmp_path), 4))
    assert str(info.value) == (f"cannot write {staged / 'state.pt'}: RuntimeError: "
                               "PytorchStreamWriter failed writing file data/0")
    assert info.value.errno is None and not list(staged.iterdir())
    monkeypatch.undo()
    ckpt.write_part(str(tmp_path), 4, "state.pt", {"round": 4})
    (tmp_path / "checkpoint" / "latest").mkdir()  # not a file: the pointer cannot be replaced
    with pytest.raises(OSError) as info:
        ckpt.commit(str(tmp_path), 4)
    assert f"cannot write {tmp_path / 'checkpoint' / 'latest'}: " in str(info.value)
    assert info.value.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
    assert not (tmp_path / "checkpoint" / ".latest.tmp").exists()


def test_concurrent_runs_get_distinct_folders(tmp_path):
    names: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def make():
        try:
            barrier.wait()
            names.append(run_mod._new_folder(str(tmp_path), "same"))
        except BaseException as exc:  # noqa: BLE001 - recorded, asserted below
            errors.append(exc)
    threads = [threading.Thread(target=make) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(names)) == 16
    assert all(os.path.isdir(n + ".partial") for n in names)


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_scheduler_signals_checkpoint_and_write_a_summary(tmp_path, sig, code):
    """The run finishes its round, checkpoints, writes summary.json (status interrupted) and exits
    128 + signal with one line naming `fedsim resume`."""
    body = small_scenario(rounds=3000)
    path = write_scenario(tmp_path, body)
    out = tmp_path / "runs"
    proc = subprocess.Popen([str(BIN / "fedsim"), "run", path, "--out", str(out), "--quiet"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lines = list(out.glob("*/metrics.jsonl"))
        if lines and lines[0].read_text().count("\n") >= 2:
            break
        time.sleep(0.1)
    import signal as signal_mod

    proc.send_signal(getattr(signal_mod, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    errors = [ln for ln in err.splitlines() if not ln.startswith("warning:")]  # a slow machine: ETA
    assert len(errors) == 1 and "fedsim resume" in errors[0]
    (folder,) = out.iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["round"] >= 2


def test_more_mpi_ranks_than_clients_leaves_no_folder(tmp_path, capsys, monkeypatch):
    """The engine's checks run before the run folder is made: 3 ranks (as `mpiexec -n 3` gives)
    for 2 clients exit 2 and write nothing (in-process: the world size is set after start-up)."""
    pytest.importorskip("mpi4py")
    from fedsim.engines import mpi as mpi_engine

    real_init = mpi_engine.MPIEngine.__init__

    def three_ranks(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.size = 3
    monkeypatch.setattr(mpi_engine.MPIEngine, "__init__", three_ranks)
    body = small_scenario(data={"clients": 2})
    body["participation"] = {"kind": "full"}
    path = write_scenario(tmp_path, body)
    code, _, err = run_cli(["run", path, "--engine", "mpi", "--quiet", "--out", str(tmp_path / "runs")],
                           capsys)
    assert code == 2 and "more MPI ranks than clients" in _one_line_error(err)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
    code, _, err = run_cli(["validate", path, "--set", "engine.kind=mpi"], capsys)
    assert code == 2 and "more MPI ranks than clients" in err


def test_flower_client_failure_is_one_line_naming_partitions_and_round(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setattr(FailsInTraining, "calls", 0)
    body = small_scenario(rounds=2, model={"kind": "tests.reliability_plugins:FailsInTraining"},
                          engine={"kind": "flower", "dtype": "float64"})
    body["participation"] = {"kind": "full"}
    path = write_scenario(tmp_path, body)
    code, _, err = run_cli(["run", path, "--out", str(tmp_path / "runs"), "--quiet"], capsys)
    assert code == 1
    line = _one_line_error(err)
    assert "partition ids) 0, 1, 2, 3, 4, 5, 6, 7 failed in round 1" in line
    assert "RuntimeError: client blew up" in line
    assert "Flower node" not in line  # no random node ids


def test_export_flower_refuses_a_non_empty_folder(tmp_path, capsys):
    path = write_scenario(tmp_path, small_scenario())
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("my notes")
    code, _, err = run_cli(["export-flower", path, str(target)], capsys)
    assert code == 2 and "not empty" in _one_line_error(err) and "--force" in err
    assert sorted(os.listdir(target)) == ["notes.txt"]
    code, _, err = run_cli(["export-flower", path, str(target), "--force"], capsys)
    assert code == 0, err
    assert (target / "notes.txt").read_text() == "my notes" and (target / "pyproject.toml").exists()


def test_rerun_is_byte_identical_apart_from_wall_time(tmp_path, capsys):
    """The README's promise: reruns give identical metrics lines apart from wall_s."""
    path = write_scenario(tmp_path, small_scenario())
    runs = []
    for k in range(2):
        code, out, err = run_cli(["run", path, "--out", str(tmp_path / f"r{k}"), "--quiet"], capsys)
        assert code == 0, err
        runs.append([{k2: v for k2, v in m.items() if k2 != "wall_s"} for m in read_metrics(out.strip())])
    assert runs[0] == runs[1] and len(runs[0]) == 3
