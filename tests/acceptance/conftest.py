"""Real gateway and consumer processes, started from the ``flashclaim`` command."""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from flashclaim.core.results import ResultStore
from flashclaim.core.settings import Settings, environ
from flashclaim.devtools import processes
from flashclaim.devtools.devstack import Stack
from flashclaim.devtools.tokens import Credentials
from tests.conftest import make_settings

LOGS = Path(__file__).resolve().parents[2] / ".stack" / "test" / "services"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


# Ports for servers a test starts: below the kernel's ephemeral range (32768 and up by
# default, where a port asked for as 0 comes from) and the dev stacks' fixed ports
# (25532 and up: flashclaim/devtools/devstack.py). A port from the ephemeral range can
# be taken by an outgoing connection (a cluster node's link to another, say) between
# the test choosing it and its server binding it: the server then fails to start.
_PORT_RANGE = range(20_000, 25_000)
_given: set[int] = set()
_pick = random.Random()  # its own: pytest-randomly reseeds the module's for each test


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on and no earlier call gave out."""
    while True:
        port = _pick.choice(_PORT_RANGE)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port


def service_env(settings: Settings, **overrides: Any) -> dict[str, str]:
    """The environment of a service (or a CLI command) run with ``settings``, a short
    shutdown grace, and ``overrides`` (setting names)."""
    # Overrides are not checked here: a test may hand a service a bad value on purpose.
    values = {**settings.environ(), **environ(log_level="INFO", shutdown_grace_seconds=5)}
    return processes.service_env({**values, **environ(**overrides)})


@dataclass
class Services:
    """Gateway and consumer processes sharing one namespace."""

    settings: Settings
    port: int = field(default_factory=free_port)
    gateway_overrides: dict[str, Any] = field(default_factory=dict)
    # Tokens for a gateway with authentication on (None: it is off).
    credentials: Credentials | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, role: str, **overrides: Any) -> subprocess.Popen[bytes]:
        instance = overrides.pop("instance_id", f"{role}-{uuid.uuid4().hex[:8]}")
        proc = processes.start_service(
            role,
            service_env(self.settings, instance_id=instance, **overrides),
            LOGS / f"{self.settings.namespace}-{instance}.log",
        )
        self.procs.append(proc)
        return proc

    async def create_coupons(self, http: aiohttp.ClientSession, amount: int, *names: str) -> None:
        """Each coupon created through the gateway with ``amount`` in stock (201)."""
        for name in names:
            async with http.post(
                f"{self.base_url}/api/coupons", json={"name": name, "amount": amount}
            ) as r:
                assert r.status == 201, await r.text()

    async def start_gateway(self, **overrides: Any) -> subprocess.Popen[bytes]:
        proc = self._spawn(
            "gateway", http_port=self.port, **{**self.gateway_overrides, **overrides}
        )
        await self.wait_healthy(proc)
        return proc

    async def start_admin(self, port: int, **overrides: Any) -> subprocess.Popen[bytes]:
        """``flashclaim admin`` on ``port``; ready once it answers (401 without a token)."""
        proc = self._spawn("admin", admin_port=port, **overrides)
        host = overrides.get("admin_host", "127.0.0.1")
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                if proc.poll() is not None:
                    raise RuntimeError(f"admin exited with {proc.returncode}")
                try:
                    async with http.get(f"http://{host}:{port}/admin/dlq") as response:
                        if response.status == 401:
                            return proc
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError("admin API did not start")

    def start_consumer(self, **overrides: Any) -> subprocess.Popen[bytes]:
        return self._spawn("consumer", **overrides)

    def start_relay(self, **overrides: Any) -> subprocess.Popen[bytes]:
        return self._spawn("relay", **overrides)

    def start_subscriber(self, queue: str) -> subprocess.Popen[bytes]:
        """The example subscriber (examples/subscriber.py), its tables in the database
        of these services, its queue ``queue``."""
        log = LOGS / f"{self.settings.namespace}-subscriber.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(EXAMPLES / "subscriber.py"),
                    "--amqp-url",
                    self.settings.amqp_url,
                    "--database-url",
                    self.settings.database_url,
                    "--namespace",
                    self.settings.namespace,
                    "--queue",
                    queue,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    async def wait_healthy(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
        async with aiohttp.ClientSession() as http:
            for _ in range(int(timeout / 0.1)):
                if proc.poll() is not None:
                    raise RuntimeError(f"gateway exited with {proc.returncode}")
                try:
                    async with http.get(f"{self.base_url}/healthz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError("gateway did not become healthy")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.send_signal(signal.SIGCONT)  # one a test froze acts on it too
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


async def until_logged(
    log: Path, text: str, more: int, timeout: float = 30, since_now: bool = True
) -> None:
    """Until ``text`` appears ``more`` more times in ``log`` than it does now (or, not
    ``since_now``, ``more`` times in all): a service's log file, polled."""

    def times() -> int:
        return log.read_text().count(text) if log.exists() else 0

    now = times() if since_now else 0
    async with asyncio.timeout(timeout):
        while True:
            if await asyncio.to_thread(times) >= now + more:
                return
            await asyncio.sleep(0.05)


async def queue_depth(settings: Settings, name: str) -> int:
    """Messages ready in a queue (none is unacknowledged once its consumers are gone)."""
    async with await aio_pika.connect(settings.amqp_url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, durable=True, passive=True)
        return int(queue.declaration_result.message_count or 0)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(url) as r:
        assert r.status == 200, url
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def until_queued(settings: Settings, expected: int, timeout: float = 10) -> int:
    """Until the command queues hold ``expected`` ready messages (or the timeout);
    the count last seen."""
    queued = 0
    async with await aio_pika.connect(settings.amqp_url) as connection:
        channel = await connection.channel()
        for _ in range(int(timeout / 0.05)):
            queued = 0
            for name in settings.topology().claims_queues:
                queue = await channel.declare_queue(name, passive=True)
                queued += queue.declaration_result.message_count or 0
            if queued >= expected:
                break
            await asyncio.sleep(0.05)
    return queued


async def until_sold_out_in_gateway(
    http: aiohttp.ClientSession, services: Services, coupon: str, timeout: float = 10
) -> None:
    """Until the gateway answers claims on the sold-out ``coupon`` by itself: a probe's
    answer is then kept under its key of the gateway's answers, moments after it is given
    (gateway/gateway_answers.py reads the holders of a sold-out coupon once, in the
    background)."""
    redis = aioredis.from_url(services.settings.redis_url)
    try:
        async with asyncio.timeout(timeout):
            for i in itertools.count():
                async with http.post(
                    f"{services.base_url}/api/coupons/claim",
                    json={"user_id": f"probe_{i}", "coupon_name": coupon},
                ) as r:
                    body = await r.json()
                assert body.get("code") == "out_of_stock", body
                # Kept a few milliseconds after the answer (gateway/gateway_answers.py).
                key = ResultStore(redis, services.settings.namespace, 1).gateway_answer_key(
                    uuid.UUID(body["request_id"])
                )
                for _ in range(10):
                    if await redis.exists(key):
                        return
                    await asyncio.sleep(0.02)
    finally:
        await redis.aclose()


@pytest.fixture
def own_servers(stack: Stack) -> Stack:
    if len(stack.owned) < 3:
        pytest.skip("fault tests restart servers: they need the suite's own servers")
    return stack


@pytest.fixture
def restore(own_servers: Stack) -> Iterator[Stack]:
    """Whatever a test stopped is running again afterwards, for the tests that follow."""
    yield own_servers
    for server in own_servers.owned:
        if server.proc is None or server.proc.poll() is not None:
            server.stop()
            server.start()


@pytest.fixture
def services(settings: Settings) -> Iterator[Services]:
    running = Services(settings)
    yield running
    running.stop()


@pytest.fixture(scope="module")
async def api(stack: Stack) -> AsyncIterator[Services]:
    """One gateway and one consumer, ready to serve, shared by a module's tests.

    Tests sharing it use coupon names of their own, so they cannot see each other's data.
    """
    running = Services(make_settings(stack, f"m{uuid.uuid4().hex[:12]}"))
    running.start_consumer()
    await running.start_gateway()
    yield running
    running.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        yield session
