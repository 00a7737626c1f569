"""SIGTERM / SIGINT as a request to stop after the current step (see docs/checkpoints.md).

    with stop_on_signals() as stop:            # the CLI: the whole job (jobs.run_edit) or run
        editor.edit_many(clip, config=config, interrupt=stop)

While the block runs, SIGTERM and the first SIGINT only set ``stop`` (a ``StopFlag``); the
edit's loops look at it between steps, save a checkpoint when there is a checkpoint directory
and raise ``InterruptedWithCheckpoint`` (exit 75), else ``Interrupted`` (exit 130). A second
SIGINT (Ctrl-C twice) raises ``KeyboardInterrupt`` at once. The previous handlers come back when
the block ends.

Python signal handlers can only be installed from the main thread: elsewhere (a worker thread of
a Python application) nothing is installed and the flag only turns on through ``request()``, which
any thread may call to stop an edit cooperatively. A signal that was ignored when the block began
(SIG_IGN, e.g. SIGINT under ``nohup``) stays ignored.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """A request to stop after the current step: set by a signal handler or by ``request()``."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: Optional[str] = None     # "SIGTERM", "SIGINT" or what request() was given
        self.installed = False                 # whether signal handlers feed this flag

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, reason: str = "a stop request") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()


@contextlib.contextmanager
def stop_on_signals(signals=SIGNALS) -> Iterator[StopFlag]:
    """Install handlers that turn SIGTERM/SIGINT into ``StopFlag.request``; restore the old ones after."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag   # signal.signal would raise ValueError here; the flag still works through request()
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and flag.requested:
            raise KeyboardInterrupt   # second Ctrl-C (or Ctrl-C after SIGTERM): stop now, no checkpoint
        flag.request(name)

    previous = {}
    try:
        for sig in signals:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue
            previous[sig] = signal.signal(sig, handler)
        flag.installed = bool(previous)
        yield flag
    finally:
        for sig, old in previous.items():
            # None: a handler installed from C that Python cannot reinstall; the default is the best guess
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
