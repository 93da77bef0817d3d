"""Starting flashclaim's service processes, and stopping child processes.

Every tool that starts a gateway, a consumer or the admin API (the local stack, the
benchmark, the acceptance tests) builds the command and the environment here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import FrameType

from flashclaim.core.settings import PREFIX

ROLES = ("gateway", "consumer", "relay", "admin")


def service_command(role: str) -> list[str]:
    """The command line of one service: ``flashclaim <role>`` with this interpreter."""
    if role not in ROLES:
        raise ValueError(f"no such service: {role!r} (one of {', '.join(ROLES)})")
    return [sys.executable, "-m", "flashclaim.cli", role]


def service_env(
    settings: Mapping[str, str], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``base`` (default: this process's environment) without any ``FLASHCLAIM_*``
    variable of its own, plus ``settings`` (from :func:`flashclaim.core.settings.environ`
    or :meth:`Settings.environ`): the service sees exactly the settings it is given."""
    given = os.environ if base is None else base
    return {**{k: v for k, v in given.items() if not k.startswith(PREFIX)}, **settings}


def audit(env: Mapping[str, str], coupons: Iterable[str]) -> subprocess.CompletedProcess[str]:
    """``flashclaim audit`` of ``coupons``, run in ``env`` (from :func:`service_env`), a
    claim pending for five minutes counted as stuck: its exit status and output."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "flashclaim.cli",
            "audit",
            "--pending-older-than",
            "300",
            *(arg for name in coupons for arg in ("--coupon", name)),
        ],
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
    )


def start_service(
    role: str, settings: Mapping[str, str], log: Path, base: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start one service with these settings, its output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            service_command(role),
            env=service_env(settings, base),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


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
