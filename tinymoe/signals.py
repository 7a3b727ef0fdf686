"""Stop on a signal at a step boundary: SIGTERM (a cluster scheduler's) and SIGINT (Ctrl-C).

    with StopSignals() as stop:
        while training:
            step()
            if stop.signum: save(); exit(128 + stop.signum)     # 143 for SIGTERM, 130 for SIGINT

The handler only records the signal, so the step in flight finishes and a checkpoint is
written from consistent weights. A second Ctrl-C while stopping raises KeyboardInterrupt
at once (the usual way out of a hung save). Handlers can only be installed from the main
thread; elsewhere (a training thread in a notebook) signals keep their default behaviour.
"""
from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(self):
        self.signum = 0          # the first signal received, 0 while none
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process stopped by signal N: 128 + N."""
        return 128 + self.signum if self.signum else 0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        return False
