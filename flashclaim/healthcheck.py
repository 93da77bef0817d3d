"""The container's health check (``HEALTHCHECK`` in deploy/Dockerfile): is the service
that runs as PID 1 answering?

- ``flashclaim gateway``: ``GET /healthz`` on its HTTP port;
- ``flashclaim admin``: its port accepts connections;
- ``flashclaim consumer`` / ``relay``: ``GET /healthz`` on ``METRICS_PORT``, which
  answers ``503`` when the process's event loop has stalled (``metrics.Endpoint``;
  healthy without a check when the port is 0: nothing is served);
- anything else (``schema apply``, an operator's command): healthy.

Exit 0 when healthy, 1 when not (what Docker expects). Standard library only.
"""

from __future__ import annotations

import socket
import sys
import urllib.request
from pathlib import Path

from flashclaim.core.settings import Settings


def role(cmdline: Path = Path("/proc/1/cmdline")) -> str | None:
    """The subcommand PID 1 runs (``flashclaim consumer`` -> ``consumer``)."""
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return None
    words = [a.decode(errors="replace") for a in args if a]
    for known in ("gateway", "consumer", "relay", "admin"):
        if known in words:
            return known
    return None


def check(service: str | None, settings: Settings, timeout: float = 2.0) -> bool:
    if service == "gateway":
        url = f"http://127.0.0.1:{settings.http_port}/healthz"
    elif service in ("consumer", "relay") and settings.metrics_port:
        url = f"http://127.0.0.1:{settings.metrics_port}/healthz"
    elif service == "admin":
        try:
            with socket.create_connection(("127.0.0.1", settings.admin_port), timeout):
                return True
        except OSError:
            return False
    else:
        return True
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def main() -> int:
    return 0 if check(role(), Settings.from_env()) else 1


if __name__ == "__main__":
    sys.exit(main())
