"""flashclaim's edge (deploy/edge/haproxy.cfg: HAProxy in front of the gateways, refusing
the claims beyond what they can take), run as shipped on this machine: by the bench's
overload row and the acceptance tests, from Debian's haproxy package."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flashclaim.devtools.devstack import wait_for_port

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "edge" / "haproxy.cfg"
# Real-time scheduling (round robin, the lowest real-time priority) for what stands for
# a machine of its own while it shares flashclaim's: the edge, and the bench's load.
# Only root may ask for it; elsewhere nothing is asked.
PRIORITY: tuple[str, ...] = ("chrt", "--rr", "1") if os.geteuid() == 0 else ()


@dataclass(frozen=True)
class Edge:
    url: str  # where clients connect
    metrics_url: str  # HAProxy's Prometheus metrics


def haproxy() -> str:
    found = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.access(found, os.X_OK):
        raise RuntimeError("haproxy is not installed (deploy/install-deps.sh installs it)")
    return found


@contextlib.contextmanager
def running(
    port: int,
    metrics_port: int,
    gateways: str,
    log: Path,
    in_flight: int | None = None,
    prioritized: bool = False,
) -> Iterator[Edge]:
    """The edge on 127.0.0.1:``port``, its metrics on ``metrics_port``, in front of
    ``gateways`` (host:port), with the shipped configuration and its defaults, but
    ``in_flight`` (FLASHCLAIM_EDGE_IN_FLIGHT) when given; at :data:`PRIORITY` when
    ``prioritized``. Stopped on leaving."""
    env = {
        **os.environ,
        "FLASHCLAIM_EDGE_HOST": "127.0.0.1",
        "FLASHCLAIM_EDGE_PORT": str(port),
        "FLASHCLAIM_EDGE_METRICS_PORT": str(metrics_port),
        "FLASHCLAIM_EDGE_GATEWAYS": gateways,
    }
    if in_flight is not None:
        env["FLASHCLAIM_EDGE_IN_FLIGHT"] = str(in_flight)
    command = [*(PRIORITY if prioritized else ()), haproxy(), "-db", "-f", str(CONFIG)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=out)
    try:
        wait_for_port(port, 10, proc, f"the edge (its log: {log})")
        yield Edge(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        proc.terminate()
        proc.wait(10)
