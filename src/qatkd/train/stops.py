"""Stopping a run without losing it: the first SIGTERM or SIGINT asks the training loop to finish
its current optimizer step, write `last.pt` with the exact position inside the epoch and end
with `RunStopped`; a second signal aborts at once.

Batch schedulers, `docker stop`, Kubernetes and preemptible VMs send SIGTERM and wait a few
seconds; a terminal's Ctrl-C sends SIGINT.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

from qatkd.errors import QatkdError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(QatkdError):
    """A run stopped on a signal after saving its position; `exit_status` is the shell's
    convention for that signal (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, step: int, total: int, signum: int, run_dir: str) -> None:
        self.step, self.total, self.signum, self.run_dir = step, total, signum, run_dir
        self.exit_status = 128 + signum
        super().__init__(f"stopped at step {step} of {total}")


class StopRequests:
    """Within `with StopRequests() as stops:`, `stops.signum` is the first stop signal received
    (None until one comes); a second one restores the default handling and is raised again,
    which aborts (SIGINT as KeyboardInterrupt). Outside the main thread, where Python cannot
    handle signals, it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore()
