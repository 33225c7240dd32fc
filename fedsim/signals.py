"""Signal handlers put back as they were found: a library must restore every disposition it
changes (a SIGINT left ignored is inherited by every process started later). Light on imports:
the sweep driver uses it without loading torch."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

WATCHED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals that stop a run (SIGHUP and SIGTERM: what batch schedulers send)."""


@contextlib.contextmanager
def signals_restored(sigs: tuple[int, ...] = WATCHED) -> Iterator[list[int]]:
    """Put the handlers of `sigs` back on exit, also when the body raises; yields the signals it
    can put back, which are the only ones a caller may change: none off the main thread, and
    not one whose handler a native library installed (`signal.getsignal` gives None: Python
    cannot restore it). Around fedsim's run handlers, and around Flower's `run_simulation`
    (Ray's `init` sets its own SIGTERM handler and never puts the old one back)."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    old = {sig: handler for sig in sigs if (handler := signal.getsignal(sig)) is not None}
    try:
        yield list(old)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
