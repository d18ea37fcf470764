"""Graceful stop on SIGTERM (schedulers, spot instances) and SIGINT (Ctrl-C).

The first signal only raises a flag: the trainer stops after the micro-batch it is in (dropping the unfinished
optimizer step; under DDP or CUDA graphs it finishes the step), writes a checkpoint of the last finished step and
ends with exit code 128 + the signal number (143 for SIGTERM, 130 for SIGINT). A second signal does not
wait: it raises StopNow at once, which abandons a save in progress (writes are atomic, so the previous
checkpoint stays as it was). Under DDP the flag is summed across ranks with the step's loss (no extra
collective), so every rank stops after the same step.
"""
from __future__ import annotations

import signal
import sys
import threading


class StopNow(BaseException):
    """A second signal: stop immediately. A BaseException so no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"second {signal.Signals(signum).name}")
        self.signum = signum


class StopRequested(Exception):
    """Raised by the trainer after the checkpoint of the last step is written; carries where it is."""

    def __init__(self, signum: int, step: int, checkpoint):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class GracefulStop:
    """Context manager: while active, SIGTERM/SIGINT set `signum` instead of ending the process.

    Outside the main thread (signal handlers cannot be installed there) it does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log=lambda msg: print(msg, file=sys.stderr, flush=True)):
        self.signum: int | None = None
        self.log = log
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise StopNow(signum)
        self.signum = signum
        self.log(f"\n{signal.Signals(signum).name} received: stopping after this micro-batch (after this step "
                 f"under DDP or CUDA graphs) and saving a checkpoint of the last finished step (send it again to "
                 f"stop at once; the previous checkpoint stays intact)")

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
