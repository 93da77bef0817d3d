"""`make run` itself: `flashclaim stack` starts every server and service, the contract's
scenarios pass against it over HTTP, and SIGTERM stops all of it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flashclaim.devstack import PROFILES
from tests.acceptance.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_stack_runs_the_scenarios_and_stops_cleanly(tmp_path: Path) -> None:
    if any(
        os.environ.get(v)
        for v in ("FLASHCLAIM_DATABASE_URL", "FLASHCLAIM_AMQP_URL", "FLASHCLAIM_REDIS_URL")
    ):
        pytest.skip("starts servers of its own")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHCLAIM_")}
    env["FLASHCLAIM_HTTP_PORT"] = str(port)
    log = open(tmp_path / "stack.log", "wb")  # noqa: SIM115
    stack = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flashclaim.cli",
            "stack",
            "--profile",
            "stacktest",
            "--consumers",
            "2",
        ],
        cwd=ROOT,  # its state goes to .stack/stacktest, reused from run to run
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert stack.poll() is None, (tmp_path / "stack.log").read_text()[-3000:]
            time.sleep(0.1)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "flashclaim.cli",
                "scenarios",
                "--url",
                f"http://127.0.0.1:{port}",
                "--burst",
                "500",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "scenarios: all passed" in result.stdout
        summary = (tmp_path / "stack.log").read_text()
        assert f"http://127.0.0.1:{port}/api/coupons" in summary
        assert "RabbitMQ UI" in summary
    finally:
        stack.send_signal(signal.SIGTERM)
        code = stack.wait(120)
        log.close()
    assert code == 0
    ports = PROFILES["stacktest"]
    assert not any(listening(p) for p in (port, ports.postgres, ports.amqp, ports.redis))
