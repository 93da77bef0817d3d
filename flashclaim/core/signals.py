"""SIGTERM/SIGINT handling shared by the long-running processes."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def stop_event_on_signals() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT; a second one exits at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def _on_signal() -> None:
        if stop.is_set():
            raise SystemExit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal)
    return stop
