"""`make run` itself: `flashclaim stack` starts every server and service, the contract's
scenarios pass against it over HTTP, and SIGTERM stops all of it."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
import redis

from flashclaim.devtools import supervision
from flashclaim.devtools.devstack import PROFILES, SERVICE_ACCOUNT, Ports
from tests.acceptance.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_scenarios(port: int, env: dict[str, str], burst: int) -> subprocess.CompletedProcess[str]:
    """`flashclaim scenarios` (Flash Sale, Double Dip, a burst) against the stack."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "flashclaim.cli", "scenarios"),
            *("--url", f"http://127.0.0.1:{port}", "--burst", str(burst)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def ctl(conf: Path, *args: str) -> str:
    """supervisorctl's answer (it exits non-zero for a stopped program: not an error)."""
    return subprocess.run(
        supervision.ctl(conf, *args), capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()


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
        result = run_scenarios(port, env, burst=500)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "scenarios: all passed" in result.stdout
        # A consumer killed outright is restarted by the stack, which keeps serving:
        # the claims made meanwhile (202 while it is away) all get their final answer,
        # consistent with the database (the scenarios check it).
        conf = ROOT / ".stack" / "stacktest" / "supervisord.conf"
        victim = int(ctl(conf, "pid", "consumer-0"))
        os.kill(victim, signal.SIGKILL)
        result = run_scenarios(port, env, burst=1000)
        assert result.returncode == 0, result.stdout + result.stderr
        for _ in range(100):
            if "RUNNING" in ctl(conf, "status", "consumer-0"):
                break
            time.sleep(0.1)
        assert "RUNNING" in ctl(conf, "status", "consumer-0")
        assert int(ctl(conf, "pid", "consumer-0")) not in (victim, 0)
        # The stack's relay publishes the events the scenarios' changes wrote.
        assert "RUNNING" in ctl(conf, "status", "relay")
        database = f"postgresql://flashclaim@127.0.0.1:{PROFILES['stacktest'].postgres}/flashclaim"
        for _ in range(300):
            with psycopg.connect(database) as conn:
                pending, sent = conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'PENDING'),"
                    " count(*) FILTER (WHERE status = 'SENT') FROM outbox"
                ).fetchone() or (None, None)
            if pending == 0 and sent:
                break
            time.sleep(0.1)
        assert (pending, bool(sent)) == (0, True)
        assert_services_use_their_own_accounts(PROFILES["stacktest"])
        summary = (tmp_path / "stack.log").read_text()
        assert f"http://127.0.0.1:{port}/api/coupons" in summary
        assert "RabbitMQ UI" in summary
        # The services' URLs are shown without their passwords.
        assert "amqp://flashclaim_app:***@" in summary and ":flashclaim_app@" not in summary
        # The stack's Prometheus scrapes every service: the gateway, both consumers,
        # the relay and RabbitMQ (twice: totals and per queue).
        prometheus = f"http://127.0.0.1:{PROFILES['stacktest'].prometheus_server}"
        assert prometheus in summary
        health: list[str] = []
        for _ in range(300):
            with urllib.request.urlopen(f"{prometheus}/api/v1/targets", timeout=5) as r:
                active = json.loads(r.read())["data"]["activeTargets"]
            health = sorted(f"{t['labels']['job']}={t['health']}" for t in active)
            if len(health) == 6 and all(h.endswith("=up") for h in health):
                break
            time.sleep(0.2)
        assert health == sorted(
            [
                "flashclaim-gateway=up",
                "flashclaim-consumer=up",
                "flashclaim-consumer=up",
                "flashclaim-relay=up",
                "rabbitmq=up",
                "rabbitmq-queues=up",
            ]
        )
    finally:
        stack.send_signal(signal.SIGTERM)
        code = stack.wait(120)
        log.close()
    assert code == 0
    ports = PROFILES["stacktest"]
    assert not any(
        listening(p)
        for p in (port, ports.postgres, ports.amqp, ports.redis, ports.prometheus_server)
    )


def assert_services_use_their_own_accounts(ports: Ports) -> None:
    """Every connection of the services, on each server, is the services' account of
    least privilege (flashclaim/core/privileges.py), not an owner or administrator."""
    admin = f"postgresql://postgres@127.0.0.1:{ports.postgres}/postgres"
    with psycopg.connect(admin) as conn:
        roles = conn.execute(
            "SELECT DISTINCT usename FROM pg_stat_activity"
            " WHERE application_name LIKE 'flashclaim-%%'"
        ).fetchall()
    assert roles == [(SERVICE_ACCOUNT,)]
    request = urllib.request.Request(
        f"http://127.0.0.1:{ports.management}/api/connections",
        headers={"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        users = {c["user"] for c in json.loads(r.read())}
    assert users == {SERVICE_ACCOUNT}
    client = redis.Redis(port=ports.redis)
    try:
        # Every client but this one (the default user, an administrator's).
        others = [c for c in client.client_list() if c["id"] != str(client.client_id())]
    finally:
        client.close()
    assert others and {c["user"] for c in others} == {SERVICE_ACCOUNT}


def start_stack(port: int, log: Path, after: int = 1) -> subprocess.Popen[bytes]:
    """Start a stack; ready once its ``after``-th summary is printed and it answers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHCLAIM_")}
    env["FLASHCLAIM_HTTP_PORT"] = str(port)
    with open(log, "ab") as out:
        stack = subprocess.Popen(
            [sys.executable, "-m", "flashclaim.cli", "stack", "--profile", "stacktest"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    for _ in range(1200):
        try:
            if log.read_text().count("flashclaim is running") >= after:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return stack
        except OSError:
            pass
        assert stack.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    raise AssertionError("stack not ready: " + log.read_text()[-3000:])


def test_a_killed_stack_leaves_nothing_that_blocks_the_next(tmp_path: Path) -> None:
    """`make run` killed with SIGKILL leaves its servers and services running; the next
    `make run` stops them and starts, and `make stop` stops them for scripts."""
    if any(
        os.environ.get(v)
        for v in ("FLASHCLAIM_DATABASE_URL", "FLASHCLAIM_AMQP_URL", "FLASHCLAIM_REDIS_URL")
    ):
        pytest.skip("starts servers of its own")
    port, log = free_port(), tmp_path / "stack.log"
    ports = PROFILES["stacktest"]
    servers = (ports.postgres, ports.amqp, ports.redis)
    first = start_stack(port, log)
    first.kill()
    first.wait()
    time.sleep(1)
    assert all(listening(p) for p in (port, *servers))  # left behind
    # Used to fail: "port 25732 is taken". (Until the new stack has stopped them, the
    # leftovers still answer: wait for the new summary before calling it ready.)
    second = start_stack(port, log, after=log.read_text().count("flashclaim is running") + 1)
    assert "stopped leftovers of an earlier run" in log.read_text()
    second.kill()
    second.wait()
    result = subprocess.run(
        [sys.executable, "-m", "flashclaim.cli", "stack", "stop", "--profile", "stacktest"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for name in ("postgres", "rabbitmq", "redis", "supervisord"):
        assert name in result.stderr
    assert not any(listening(p) for p in (port, *servers))
