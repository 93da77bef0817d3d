"""Graceful shutdown, overload and rate limiting, with real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path

import aio_pika
import aiohttp
import psycopg
import pytest
import redis.asyncio as aioredis

from flashclaim.core.messages import ClaimCommand
from flashclaim.core.settings import Settings
from flashclaim.devtools import scenarios
from tests.acceptance.conftest import LOGS, Services, free_port, until_queued
from tests.conftest import create_coupon_row
from tests.proxy import Proxy


async def test_consumer_sigterm_finishes_its_batch_and_loses_nothing(
    services: Services, settings: Settings, coupon_name: str
) -> None:
    create_coupon_row(settings.database_url, coupon_name, 100_000)
    topology = settings.topology()
    total = 3000
    async with await aio_pika.connect(settings.amqp_url) as connection:
        channel = await connection.channel()
        declared = await topology.declare(channel)
        for i in range(total):
            command = ClaimCommand(uuid.uuid4(), f"user_{i}", coupon_name)
            await declared.commands.publish(
                aio_pika.Message(command.body(), message_id=str(command.request_id)),
                coupon_name,
            )
        consumer = services.start_consumer(batch_size=50)
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            count = "SELECT count(*) FROM claims WHERE coupon_name = %s"
            for _ in range(3000):
                if (conn.execute(count, (coupon_name,)).fetchone() or (0,))[0] >= 300:
                    break
                await asyncio.sleep(0.01)
            consumer.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(consumer.wait, 30) == 0
            (applied,) = conn.execute(count, (coupon_name,)).fetchone() or (0,)
        # Whatever was not applied is back in the queue, unacknowledged by nobody.
        waiting = 0
        for name in topology.claims_queues:
            queue = await channel.declare_queue(name, passive=True)
            waiting += queue.declaration_result.message_count or 0
        assert applied < total
        assert applied + waiting == total
    services.start_consumer()
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        for _ in range(600):
            if conn.execute(count, (coupon_name,)).fetchone() == (total,):
                break
            await asyncio.sleep(0.05)
        assert conn.execute(count, (coupon_name,)).fetchone() == (total,)
        assert conn.execute(
            "SELECT remaining_amount FROM coupons WHERE name = %s", (coupon_name,)
        ).fetchone() == (100_000 - total,)


@pytest.mark.parametrize("connected_first", [True, False])
async def test_consumer_sigterm_while_the_broker_is_unreachable_exits_within_the_grace(
    services: Services, settings: Settings, connected_first: bool
) -> None:
    proxy, amqp_url = Proxy.before(settings.amqp_url)
    try:
        if not connected_first:
            proxy.cut()  # the broker is away from the start
        instance = f"consumer-{uuid.uuid4().hex[:8]}"
        consumer = services.start_consumer(
            amqp_url=amqp_url,
            shutdown_grace_seconds=2,
            instance_id=instance,
        )
        # Connected and consuming, or waiting for the broker: either way past start-up
        # (a SIGTERM before the process has its handlers ends it as the signal does).
        waiting = "consumer started" if connected_first else "broker not reachable yet"
        log = LOGS / f"{settings.namespace}-{instance}.log"
        for _ in range(300):
            if log.exists() and waiting in log.read_text():
                break
            await asyncio.sleep(0.1)
        assert waiting in log.read_text()
        if connected_first:
            proxy.cut()
        await asyncio.sleep(1.0)
        started = time.monotonic()
        consumer.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(consumer.wait, 20)
        # Grace (2 s) plus a few seconds at most to give up on closing connections.
        assert time.monotonic() - started < 12
        assert code == 0
    finally:
        proxy.close()


async def test_gateway_sigterm_drains_in_flight_requests(
    services: Services, http: aiohttp.ClientSession, coupon_name: str, settings: Settings
) -> None:
    create_coupon_row(settings.database_url, coupon_name, 20)
    # No consumer: each claim waits its full second in the gateway, then answers 202.
    # One message per claim, so that the queue's depth counts the claims.
    gateway = await services.start_gateway(claim_wait_seconds=1.5, publish_max_claims=1)
    in_flight = [
        asyncio.create_task(
            http.post(
                f"{services.base_url}/api/coupons/claim",
                json={"user_id": f"u{i}", "coupon_name": coupon_name},
            )
        )
        for i in range(20)
    ]
    # Every claim is published (queued, waiting for a consumer) when the signal comes.
    assert await until_queued(settings, 20) == 20
    gateway.send_signal(signal.SIGTERM)
    responses = await asyncio.gather(*in_flight)
    assert [r.status for r in responses] == [202] * 20
    accepted = [(await r.json())["request_id"] for r in responses]
    assert await asyncio.to_thread(gateway.wait, 30) == 0
    # Nothing accepted was lost: a consumer started now applies every one of them (the
    # stock is enough for all, so each accepted claim must become a claim row).
    services.start_consumer()
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        applied = "SELECT message_id::text FROM claims WHERE coupon_name = %s"
        for _ in range(300):
            if len(conn.execute(applied, (coupon_name,)).fetchall()) == 20:
                break
            await asyncio.sleep(0.05)
        assert sorted(r[0] for r in conn.execute(applied, (coupon_name,))) == sorted(accepted)


async def test_overloaded_gateway_refuses_with_503_instead_of_queueing(
    services: Services, http: aiohttp.ClientSession, coupon_name: str, settings: Settings
) -> None:
    create_coupon_row(settings.database_url, coupon_name, 100)
    await services.start_gateway(max_in_flight_claims=5, claim_wait_seconds=1)
    responses = await asyncio.gather(
        *(
            http.post(
                f"{services.base_url}/api/coupons/claim",
                json={"user_id": f"u{i}", "coupon_name": coupon_name},
            )
            for i in range(30)
        )
    )
    statuses = sorted(r.status for r in responses)
    assert statuses.count(202) == 5  # held until the wait ran out (no consumer)
    assert statuses.count(503) == 25
    refused = next(r for r in responses if r.status == 503)
    assert (await refused.json())["code"] == "overloaded"
    assert "Retry-After" in refused.headers


async def test_rate_limit_answers_429_per_client(
    services: Services, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    """A token bucket per client address: one client's burst does not limit another,
    tokens come back at the configured rate, health checks and the admin port are apart."""
    await services.start_gateway(rate_limit_per_second=0.5, rate_limit_burst=3)
    url = f"{services.base_url}/api/coupons/{coupon_name}"
    statuses = []
    retry_after = 0
    for _ in range(5):
        async with http.get(url) as r:
            statuses.append(r.status)
            if r.status == 429:
                body = await r.json()
                assert body["code"] == "rate_limited"
                retry_after = int(r.headers["Retry-After"])
                assert retry_after >= 1
    assert statuses == [404, 404, 404, 429, 429]
    # Another client (another source address on loopback) has a bucket of its own.
    other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=other) as second:
        for _ in range(3):
            async with second.get(url) as r:
                assert r.status == 404
        async with second.get(url) as r:
            assert r.status == 429
    # Health checks are not rate limited.
    async with http.get(f"{services.base_url}/healthz") as r:
        assert r.status == 200
    # After Retry-After the first client has a token again: one per two seconds, not a
    # refilled bucket (3).
    await asyncio.sleep(retry_after)
    served = 0
    for _ in range(3):
        async with http.get(url) as r:
            if r.status == 429:
                break
            assert r.status == 404
            served += 1
    assert 1 <= served <= 2, served
    # The operators' API is another port, another process: never limited.
    admin_port = free_port()
    token = "t" * 40
    await services.start_admin(admin_port, admin_token=token)
    headers = {"Authorization": f"Bearer {token}", "X-Operator": "test"}
    for _ in range(10):
        async with http.get(f"http://127.0.0.1:{admin_port}/admin/dlq", headers=headers) as r:
            assert r.status == 200


async def test_behind_a_trusted_proxy_the_rate_limit_is_per_forwarded_client(
    services: Services, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    """Behind an ingress every request comes from the ingress's address: with it in
    TRUSTED_PROXIES each client it names has a bucket of its own, and a client that is not
    a trusted proxy cannot pick its bucket by writing X-Forwarded-For."""
    await services.start_gateway(
        rate_limit_per_second=0.1, rate_limit_burst=2, trusted_proxies="127.0.0.1/32"
    )
    url = f"{services.base_url}/api/coupons/{coupon_name}"

    async def statuses(session: aiohttp.ClientSession, forwarded: str, n: int) -> list[int]:
        out = []
        for _ in range(n):
            async with session.get(url, headers={"X-Forwarded-For": forwarded}) as r:
                out.append(r.status)
        return out

    # Through the "ingress" (127.0.0.1, trusted): one bucket per forwarded client.
    assert await statuses(http, "203.0.113.1", 3) == [404, 404, 429]
    assert await statuses(http, "203.0.113.2", 3) == [404, 404, 429]
    # A spoofed first entry is not believed: the ingress's own entry (the last) counts.
    assert await statuses(http, "198.51.100.9, 203.0.113.1", 1) == [429]
    # From an address that is not a trusted proxy, X-Forwarded-For is ignored: each new
    # forged value still lands in that address's one bucket.
    direct = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=direct) as stranger:
        seen = [(await statuses(stranger, f"192.0.2.{i}", 1))[0] for i in range(3)]
    assert seen == [404, 404, 429]


def any_alive(pids: set[int]) -> bool:
    return any(os.path.exists(f"/proc/{pid}") for pid in pids)


def worker_pids(supervisor: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{supervisor}/task").iterdir():
        found |= {int(p) for p in (task / "children").read_text().split()}
    return found


def listening_sockets(port: int) -> int:
    """The TCP sockets listening on ``port`` (state 0A in /proc/net/tcp and tcp6)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            count += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port
    return count


async def test_gateway_workers_share_the_port_and_are_restarted(
    services: Services, http: aiohttp.ClientSession
) -> None:
    services.start_consumer()
    supervisor = await services.start_gateway(gateway_workers=2)
    for _ in range(100):
        if len(worker_pids(supervisor.pid)) == 2:
            break
        await asyncio.sleep(0.1)
    workers = worker_pids(supervisor.pid)
    assert len(workers) == 2
    # One listening socket a worker, the arbiter's shut down: the kernel spreads the
    # connections over the workers alone (gateway/service.py, GatewayWorker).
    assert listening_sockets(services.port) == 2
    report = await scenarios.flash_sale(http, services.base_url, users=200, stock=20)
    assert report.violations == []
    # A worker that dies is replaced; the port keeps answering meanwhile.
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    for _ in range(100):
        now = worker_pids(supervisor.pid)
        if len(now) == 2 and victim not in now:
            break
        await asyncio.sleep(0.1)
    assert len(now) == 2 and victim not in now
    # Connections the dead worker held were reset with it; new ones are served.
    async with aiohttp.ClientSession() as fresh:
        for _ in range(100):
            try:
                async with fresh.get(f"{services.base_url}/readyz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        report = await scenarios.double_dip(fresh, services.base_url)
    assert report.violations == []
    assert listening_sockets(services.port) == 2
    supervisor.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(supervisor.wait, 30) == 0
    assert not any_alive(now)


async def test_a_gateway_that_cannot_boot_exits_instead_of_respawning(
    services: Services,
) -> None:
    """A bad setting fails every worker at boot: the gateway stops with an error (a
    supervisor above it then backs off) rather than respawning workers forever."""
    proc = services._spawn(
        "gateway",
        http_port=services.port,
        gateway_workers=2,
        redis_url="redis://127.0.0.1:not-a-port/0",
    )
    code = await asyncio.to_thread(proc.wait, 60)
    assert code == 3  # the README's: a worker that fails at boot stops the gateway


async def test_each_gateway_worker_has_a_reply_channel_of_its_own(
    services: Services, http: aiohttp.ClientSession
) -> None:
    """A consumer publishes each reply to the channel of the worker that waits for it:
    no worker decodes the replies of another."""
    services.start_consumer()
    supervisor = await services.start_gateway(gateway_workers=2)
    redis = aioredis.from_url(services.settings.redis_url)
    try:
        pattern = f"{services.settings.namespace}:replies:*"
        for _ in range(100):
            channels = await redis.pubsub_channels(pattern)
            if len(channels) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(channels) == 2, channels
        counts = dict(await redis.pubsub_numsub(*channels))
        assert list(counts.values()) == [1, 1], counts
        report = await scenarios.flash_sale(http, services.base_url, users=50, stock=5)
        assert report.violations == []
    finally:
        await redis.aclose()
        supervisor.send_signal(signal.SIGTERM)
        await asyncio.to_thread(supervisor.wait, 30)
