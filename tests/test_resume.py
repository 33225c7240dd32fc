"""Checkpoint and resume: a resumed run's metrics.jsonl equals the uninterrupted run's bit for
bit (apart from host times), wherever the run stopped — mid-round, during an evaluation, while a
checkpoint was being written, by SIGTERM or by kill -9 — for every registered strategy; corrupt,
foreign and missing checkpoints exit 2 naming the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsim import checkpoint as ckpt
from fedsim import round as kernel
from fedsim.config import parse_scenario
from fedsim.errors import RunInterrupted
from fedsim.run import execute
from tests.conftest import ROOT, read_metrics, run_cli, strategy_scenario, write_scenario

BIN = Path(sys.executable).parent
HOST_KEYS = ("wall_s",)


def _lines(run: str) -> list[dict[str, Any]]:
    """metrics.jsonl without host times."""
    return [{k: v for k, v in m.items() if k not in HOST_KEYS} for m in read_metrics(run)]


def _scenario(body: dict[str, Any], tmp: Path, **over: Any) -> Any:
    return parse_scenario({**body, "output": {"dir": str(tmp)}, **over})


def _signal_on_call(monkeypatch, module: Any, attr: str, call: int, signum: int = signal.SIGINT) -> None:
    """Send `signum` to this process during the `call`-th call of module.attr."""
    real, count = getattr(module, attr), [0]

    def wrapped(*a: Any, **kw: Any) -> Any:
        count[0] += 1
        if count[0] == call:
            os.kill(os.getpid(), signum)
        return real(*a, **kw)
    monkeypatch.setattr(module, attr, wrapped)


def _interrupted(sc: Any) -> tuple[str, int]:
    """Run `sc` until it stops on the signal a test arranged; (run folder, exit code)."""
    with pytest.raises(RunInterrupted) as stop:
        execute(sc, quiet=True)
    text = str(stop.value)
    assert "fedsim resume " in text
    return text.rsplit("fedsim resume ", 1)[1].strip(), stop.value.code


def _registered() -> list[str]:
    from strategies import STRATEGIES

    return STRATEGIES.names()


@pytest.mark.parametrize("name", _registered())
def test_interrupted_mid_round_then_resumed_equals_uninterrupted(name, tmp_path, monkeypatch):
    # Prepare: 5 rounds, a checkpoint every 2; SIGINT during round 3's local training
    body = {**strategy_scenario(name), "rounds": 5, "checkpoint": {"every": 2}}
    ref, _ = execute(_scenario(body, tmp_path / "ref"), quiet=True)
    calls_per_round = 1  # 7 clients, one chunk: one client_step per round
    _signal_on_call(monkeypatch, kernel, "client_step", 3 * calls_per_round)
    # Execute: the interrupted run, then `resume`
    run, code = _interrupted(_scenario(body, tmp_path / "cut"))
    summary = json.loads(Path(run, "summary.json").read_text())
    monkeypatch.undo()
    path, _ = execute(_scenario(body, tmp_path / "cut"), quiet=True, resume=run)
    # Assert: exit code 130, round 3 finished before stopping; the resumed run is the reference
    assert code == 130 and summary["status"] == "interrupted" and summary["round"] == 3
    assert run.endswith(".partial") and path == run.removesuffix(".partial")
    assert _lines(path) == _lines(ref)


@pytest.mark.parametrize("name", ["fedavg", "co2", "gossip"])
def test_interrupted_during_an_evaluation(name, tmp_path, monkeypatch):
    # Prepare: evaluations every 2 rounds; SIGTERM during the second evaluation (round 4)
    body = {**strategy_scenario(name), "rounds": 6, "checkpoint": {"every": 3},
            "eval": {"every": 2}}
    ref, _ = execute(_scenario(body, tmp_path / "ref"), quiet=True)
    _signal_on_call(monkeypatch, kernel, "metrics_line", 2, signal.SIGTERM)
    # Execute
    run, code = _interrupted(_scenario(body, tmp_path / "cut"))
    monkeypatch.undo()
    path, _ = execute(_scenario(body, tmp_path / "cut"), quiet=True, resume=run)
    # Assert
    assert code == 143
    assert _lines(path) == _lines(ref)


class _Killed(BaseException):
    """Stands in for kill -9: nothing after it runs (not even `except Exception`)."""


def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, monkeypatch):
    # Prepare: checkpoints after rounds 2 and 4; the process dies after writing the clients part
    # of the second one, before its state.pt (so round-4's checkpoint is incomplete)
    body = {**strategy_scenario("scaffold"), "rounds": 6, "checkpoint": {"every": 2}}
    ref, _ = execute(_scenario(body, tmp_path / "ref"), quiet=True)
    real, calls = ckpt.write_part, []

    def dying(folder: str, rnd: int, name: str, payload: dict) -> None:
        calls.append((rnd, name))
        if rnd == 4 and name == "state.pt":
            raise _Killed
        real(folder, rnd, name, payload)
    monkeypatch.setattr(ckpt, "write_part", dying)
    # Execute
    with pytest.raises(_Killed):
        execute(_scenario(body, tmp_path / "cut"), quiet=True)
    monkeypatch.undo()
    (run,) = (tmp_path / "cut").glob("*.partial")
    assert ckpt.latest(str(run)).endswith("round-00000002")
    assert len(read_metrics(str(run))) == 4  # lines of rounds 3 and 4 beyond the checkpoint
    path, _ = execute(_scenario(body, tmp_path / "cut"), quiet=True, resume=str(run))
    # Assert: the lines after the checkpoint were rewritten, not duplicated
    assert (4, "clients-00000.pt") in calls
    assert _lines(path) == _lines(ref)


@pytest.mark.parametrize("name", ["fedavg", "co2", "ef21"])
def test_a_finished_run_extended_with_more_rounds_equals_the_longer_run(name, tmp_path, capsys):
    # Prepare: a 3-round run and a 6-round reference
    body = {**strategy_scenario(name), "rounds": 3}
    short, _ = execute(_scenario(body, tmp_path / "a"), quiet=True)
    ref, _ = execute(_scenario({**body, "rounds": 6}, tmp_path / "b"), quiet=True)
    # Execute: fedsim resume --set rounds=6
    code, out, err = run_cli(["resume", short, "--set", "rounds=6", "--quiet"], capsys)
    # Assert
    assert code == 0, err
    assert out.strip() == short
    assert _lines(short) == _lines(ref)
    assert json.loads(Path(short, "summary.json").read_text())["rounds"] == 6


def _cli(args: list[str], **kw: Any) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([str(BIN / "fedsim"), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = list(out.glob("*.partial/checkpoint/latest"))
        if found:
            return found[0].parents[1]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_process_resumes_to_the_uninterrupted_metrics(signum, tmp_path):
    # Prepare: a 60-round run checkpointing every round (long enough to be killed mid-run)
    body = {**strategy_scenario("fedavg"), "rounds": 60, "checkpoint": {"every": 1}}
    path = write_scenario(tmp_path, body)
    ref, _ = execute(_scenario(body, tmp_path / "ref"), quiet=True)
    proc = _cli(["run", path, "--quiet", "--out", str(tmp_path / "cut")])
    run = _wait_for_checkpoint(tmp_path / "cut", proc)
    # Execute: the signal, then `fedsim resume`
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    lines = (run / "metrics.jsonl").read_text()
    status = json.loads((run / "summary.json").read_text())["status"] if signum == signal.SIGTERM else None
    resumed = subprocess.run([str(BIN / "fedsim"), "resume", str(run), "--quiet"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    # Assert: whole lines on disk; SIGTERM: exit 143, one line naming the resume command
    assert lines == "" or lines.endswith("\n")
    if signum == signal.SIGTERM:
        assert proc.returncode == 143, err
        assert "Traceback" not in err and f"fedsim resume {run}" in err
        assert status == "interrupted"
    else:
        assert proc.returncode == -signal.SIGKILL
    assert resumed.returncode == 0, resumed.stderr
    final = resumed.stdout.strip()
    assert final == str(run).removesuffix(".partial")
    assert _lines(final) == _lines(ref)


# ---- checkpoints that must be refused --------------------------------------------------------

@pytest.fixture
def finished(tmp_path) -> str:
    body = {**strategy_scenario("fedavg"), "rounds": 2}
    run, _ = execute(_scenario(body, tmp_path / "runs"), quiet=True)
    assert run is not None
    return run


def _state(run: str) -> Path:
    return Path(ckpt.latest(run), "state.pt")


def test_truncated_checkpoint_exits_2_naming_the_file(finished, capsys):
    state = _state(finished)
    state.write_bytes(state.read_bytes()[:100])
    code, _, err = run_cli(["resume", finished, "--set", "rounds=4"], capsys)
    assert code == 2 and str(state) in err and "cannot read the checkpoint" in err
    assert "Traceback" not in err


def test_checkpoint_of_another_scenario_exits_2(finished, capsys):
    # Prepare: the run folder's config now says another seed
    cfg = Path(finished, "config.yaml")
    cfg.write_text(cfg.read_text().replace("seed: 3", "seed: 4"))
    # Execute
    code, _, err = run_cli(["resume", finished, "--set", "rounds=4"], capsys)
    # Assert: refused, nothing restarted from round 0
    assert code == 2 and "different scenario" in err and str(_state(finished)) in err
    assert len(read_metrics(finished)) == 2


def test_checkpoint_with_pickled_code_is_refused(finished, capsys):
    torch.save({"format": ckpt.FORMAT, "hook": subprocess.Popen}, _state(finished))
    code, _, err = run_cli(["resume", finished, "--set", "rounds=4"], capsys)
    assert code == 2 and str(_state(finished)) in err and "Traceback" not in err


def test_foreign_file_format_exits_2(finished, capsys):
    torch.save({"format": "something-else", "version": 1}, _state(finished))
    code, _, err = run_cli(["resume", finished, "--set", "rounds=4"], capsys)
    assert code == 2 and "not a fedsim checkpoint" in err


def test_resume_of_a_folder_that_is_not_a_run_exits_2(tmp_path, capsys):
    code, _, err = run_cli(["resume", str(tmp_path)], capsys)
    assert code == 2 and "not a run folder" in err and str(tmp_path) in err


def test_run_folder_without_checkpoint_exits_2(finished, capsys):
    import shutil

    shutil.rmtree(Path(finished, "checkpoint"))
    code, _, err = run_cli(["resume", finished], capsys)
    assert code == 2 and "no checkpoint" in err


def test_checkpoint_every_zero_writes_only_the_final_one(tmp_path, monkeypatch):
    written: list[int] = []
    real = ckpt.commit
    monkeypatch.setattr(ckpt, "commit", lambda folder, rnd: written.append(rnd) or real(folder, rnd))
    body = {**strategy_scenario("fedavg"), "rounds": 4, "checkpoint": {"every": 0}}
    execute(_scenario(body, tmp_path), quiet=True)
    assert written == [4]


def test_default_checkpoint_interval_is_a_tenth_of_the_rounds():
    assert ckpt.every(100, None) == 10 and ckpt.every(5, None) == 1 and ckpt.every(30, 7) == 7


@pytest.mark.parametrize("name", ["fedavg", "scaffold", "co2", "gossip", "ef21"])
def test_flower_in_process_interrupted_then_resumed_equals_uninterrupted(name, tmp_path, monkeypatch):
    # Prepare: the Flower engine (multiplexed in-process nodes); SIGINT in round 3's training
    body = {**strategy_scenario(name), "rounds": 5, "checkpoint": {"every": 2},
            "engine": {"kind": "flower", "dtype": "float64"}}
    ref, _ = execute(_scenario(body, tmp_path / "ref"), quiet=True)
    _signal_on_call(monkeypatch, kernel, "client_step", 3)
    # Execute
    run, code = _interrupted(_scenario(body, tmp_path / "cut"))
    monkeypatch.undo()
    path, _ = execute(_scenario(body, tmp_path / "cut"), quiet=True, resume=run)
    # Assert: flower_bytes_* too (the checkpoint's own messages are not counted)
    assert code == 130
    assert _lines(path) == _lines(ref)
    assert "flower_bytes_up" in _lines(path)[-1]


def test_flower_checkpoint_resumes_on_the_multiplex_engine(tmp_path, capsys):
    """The checkpoint format is the engines' common one: a Flower run extended on multiplex."""
    body = {**strategy_scenario("scaffold"), "rounds": 2,
            "engine": {"kind": "flower", "dtype": "float64"}}
    short, _ = execute(_scenario(body, tmp_path / "a"), quiet=True)
    ref, _ = execute(_scenario({**body, "rounds": 4, "engine": {"kind": "multiplex", "dtype": "float64"}},
                               tmp_path / "b"), quiet=True)
    code, _, err = run_cli(["resume", short, "--set", "rounds=4", "--engine", "multiplex", "--quiet"], capsys)
    assert code == 0, err
    keys = ("round", "train_loss", "test_loss", "test_accuracy", "bytes_up", "bytes_down", "sim_time_s")
    got, want = _lines(short)[2:], _lines(ref)[2:]
    assert [{k: m[k] for k in keys} for m in got] == [{k: m[k] for k in keys} for m in want]


def test_resuming_a_flower_strategy_object_run_exits_2(tmp_path, capsys):
    body = {**strategy_scenario("fedavg"), "rounds": 2, "participation": {"kind": "full"},
            "strategy": {"name": "flower", "class": "flwr.serverapp.strategy.FedAvg"},
            "engine": {"kind": "flower", "dtype": "float64"}}
    run, _ = execute(_scenario(body, tmp_path / "a"), quiet=True)
    os.makedirs(Path(run, "checkpoint"), exist_ok=True)
    code, _, err = run_cli(["resume", run, "--set", "rounds=4"], capsys)
    assert code == 2 and "no checkpoint" in err, err


def test_a_finished_run_keeps_only_its_last_checkpoint(tmp_path):
    # checkpoints after rounds 2, 4, 6: the older folders are removed (on a background thread,
    # waited for before the run folder is renamed), leaving round 6 complete and named by latest
    body = {**strategy_scenario("scaffold"), "rounds": 6, "checkpoint": {"every": 2}}
    path, _ = execute(_scenario(body, tmp_path), quiet=True)
    folder = Path(path, "checkpoint")
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "round-00000006"]
    assert ckpt.latest(path) == str(folder / "round-00000006")
    assert sorted(p.name for p in (folder / "round-00000006").iterdir()) == ["clients-00000.pt", "state.pt"]
    assert not [t for t in threading.enumerate() if t.name == "fedsim-checkpoint-sweep"]


def test_a_stale_part_of_another_process_layout_is_not_read_back(tmp_path):
    # A killed 3-process run left clients-00002.pt in round 4's staging folder; the resumed
    # single-process run stages round 4 there again: its checkpoint is its own part only.
    x = {"x": torch.ones(2, 3)}
    ckpt.write_part(str(tmp_path), 4, "clients-00002.pt", ckpt.clients_payload(torch.tensor([5, 6]), x,
                                                                               [1.0, 2.0], 2, 3))
    ckpt.write_part(str(tmp_path), 4, "clients-00000.pt",
                    ckpt.clients_payload(torch.arange(7), {"x": torch.zeros(7, 3)}, [0.5, 1.0]))
    ckpt.write_part(str(tmp_path), 4, "state.pt", {"round": 4})
    path = ckpt.commit(str(tmp_path), 4)
    parts = ckpt.client_parts(path)
    assert [p["ranks"] for p in parts] == [1] and parts[0]["ids"].tolist() == list(range(7))
