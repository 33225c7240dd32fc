"""fedsim puts back every signal disposition it changes, also when the run fails: a SIGINT left
ignored (or a SIGTERM left on a dead run's handler) would be inherited by, or swallow the stop of,
everything the process does afterwards. tests/conftest.py checks it after every test of the
suite (`_signals_left_as_found`); these tests check the run's handlers and that guard itself."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading

import pytest

from fedsim.config import parse_scenario
from fedsim.errors import RunInterrupted
from fedsim.run import WATCHED, execute, signals_restored
from tests.conftest import ROOT, dispositions, small_scenario


def mine(signum, frame):  # the caller's own handler: neither a default nor fedsim's
    pass


@pytest.fixture
def own_handlers():
    with signals_restored():
        for sig in WATCHED:
            signal.signal(sig, mine)
        yield


def flaky(fail: str):
    return parse_scenario(small_scenario(rounds=2, model={"kind": "tests.sweep_plugins:Flaky", "fail": fail}))


@pytest.mark.parametrize("fail,raises", [("never", None), ("sigterm", RunInterrupted),
                                         ("error", RuntimeError), ("interrupt", KeyboardInterrupt)])
def test_a_run_puts_back_the_handlers_it_found(tmp_path, monkeypatch, own_handlers, fail, raises):
    """Finished, stopped by its own SIGTERM, failed in a round (an exception, Ctrl-C twice): the
    caller's handlers are back. "sigterm" also shows the run had its own handler meanwhile (else
    `mine` would swallow the signal and the run would finish)."""
    monkeypatch.syspath_prepend(str(ROOT))
    if raises in (RuntimeError, KeyboardInterrupt):  # raised after round 1, inside the run
        def fail_after_round(*args):
            raise raises("after round 1")
        monkeypatch.setattr("fedsim.run.EtaWarning.round_done", fail_after_round)
    with pytest.raises(raises) if raises else contextlib.nullcontext():
        execute(flaky("sigterm" if fail == "sigterm" else "never"), out_dir=str(tmp_path / "runs"),
                quiet=True)
    assert [signal.getsignal(sig) for sig in WATCHED] == [mine] * 3


def test_a_run_started_with_sigint_ignored_leaves_it_ignored(tmp_path, monkeypatch):
    """A background job of a script starts with SIGINT ignored: the run handles it meanwhile
    and leaves it ignored (in Python's record and in the kernel's mask)."""
    monkeypatch.syspath_prepend(str(ROOT))
    with signals_restored():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        before = dispositions()
        execute(flaky("never"), out_dir=str(tmp_path / "runs"), quiet=True)
        assert dispositions() == before and before[signal.SIGINT] == (signal.SIG_IGN, True)


def test_a_run_off_the_main_thread_changes_no_handler(tmp_path, monkeypatch):
    """Embedded use (a worker thread cannot set handlers): the run works and installs none."""
    monkeypatch.syspath_prepend(str(ROOT))
    before, seen, done = dispositions(), [], []

    def observe(*args):  # called after each round, inside the run
        seen.append(dispositions())

    def work():
        with signals_restored() as kept:
            assert kept == []
        done.append(execute(flaky("never"), write=False, quiet=True))
    monkeypatch.setattr("fedsim.run.EtaWarning.round_done", observe)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join(120)
    assert done and done[0][1]["final"]["round"] == 2
    assert seen and all(d == before for d in seen)


def test_signals_restored_puts_them_back_when_the_body_raises(own_handlers):
    """As around Flower's `run_simulation` when a ServerApp fails after Ray's init."""
    with pytest.raises(RuntimeError, match="app failed"):
        with signals_restored() as kept:
            assert kept == list(WATCHED)
            for sig in WATCHED:
                signal.signal(sig, signal.SIG_IGN)
            raise RuntimeError("app failed")
    assert [signal.getsignal(sig) for sig in WATCHED] == [mine] * 3


def test_a_handler_python_cannot_put_back_is_left_alone(monkeypatch):
    """`signal.getsignal` gives None for a handler a native library installed: neither
    yielded (so the run leaves that signal to its owner) nor written back."""
    real = signal.getsignal
    monkeypatch.setattr(signal, "getsignal", lambda s: None if s == signal.SIGHUP else real(s))
    with signals_restored() as kept:
        assert kept == [signal.SIGINT, signal.SIGTERM]


def test_the_suite_guard_sees_python_and_native_changes():
    """conftest's `dispositions`: a handler set from Python and a SIG_IGN set by native code
    behind Python's back (its record unchanged, the kernel's mask not) both show."""
    before = dispositions()
    with signals_restored():
        signal.signal(signal.SIGHUP, mine)
        assert dispositions()[signal.SIGHUP] == (mine, False) != before[signal.SIGHUP]
    assert dispositions() == before
    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.signal(int(signal.SIGHUP), 1)  # SIG_IGN, as a C library would
    try:
        assert signal.getsignal(signal.SIGHUP) == before[signal.SIGHUP][0]  # Python did not see it
        assert dispositions()[signal.SIGHUP][1] is True
    finally:
        signal.signal(signal.SIGHUP, before[signal.SIGHUP][0])  # the kernel's disposition back
    assert dispositions() == before
