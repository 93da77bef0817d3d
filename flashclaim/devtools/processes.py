"""Supervising child processes: a stop request, and stopping the children."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterable
from types import FrameType


class StopRequest:
    """Set by the first SIGTERM or SIGINT this process receives (synchronous code)."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def terminate(procs: Iterable[subprocess.Popen[bytes]], grace: float) -> list[int]:
    """SIGTERM every child still running, wait up to ``grace`` seconds for each, then
    SIGKILL what is left; return their exit codes (those killed count as 1)."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(grace))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes.append(1)
    return codes
