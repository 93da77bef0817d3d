"""Servers that stay up but lose what they hold or stop taking work: Redis flushed
while connected, Redis evicting at a tiny maxmemory, a gateway cut from Redis alone,
RabbitMQ's memory and disk alarms blocking publishers. Each under load, each followed
by the full audit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from flashclaim.core.settings import Settings
from flashclaim.devtools.devstack import RabbitMQ, Stack
from tests.acceptance.conftest import Services
from tests.acceptance.load import Load, Window, faulted, verify
from tests.proxy import Proxy

pytestmark = [
    pytest.mark.faults,
    # Servers die under these tests' clients mid-connection: a client socket finalised
    # without its close (seen once, in the load client) is no finding here.
    pytest.mark.filterwarnings(
        r"ignore:Exception ignored in. <socket\.socket:pytest.PytestUnraisableExceptionWarning"
    ),
]

GATEWAY = {"claim_wait_seconds": 2, "breaker_recovery_seconds": 1}
REACHED = 10  # claims in flight the fault must have reached (see test_faults.py)


@pytest.fixture
async def redis(settings: Settings, restore: Stack) -> AsyncIterator[aioredis.Redis]:
    """The suite's Redis, as its administrator; its memory limit put back afterwards."""
    client = aioredis.from_url(settings.redis_url)
    (limit,) = (await client.config_get("maxmemory")).values()
    assert limit is not None
    yield client
    await client.config_set("maxmemory", limit)
    await client.aclose()


async def test_redis_flushed_while_connected_mid_load(
    services: Services, http: aiohttp.ClientSession, settings: Settings, redis: aioredis.Redis
) -> None:
    """FLUSHALL under load: results, pending markers, key fingerprints and the gateway's
    answers gone at once, the connections kept. Every claim still gets one final answer,
    the database's (the inbox holds them all)."""
    services.start_consumer()
    await services.start_gateway(**GATEWAY)
    load = await Load(services, http).start()
    held = []

    async def flush(window: Window) -> None:
        held.append(await redis.dbsize())
        await redis.flushall()
        window.hit()

    answers, window = await faulted(load, flush)
    await verify(settings, load, answers)
    assert held[0] > 100, f"only {held[0]} keys were lost"  # what the load held there
    assert len(window.reached(answers, delayed=False)) >= REACHED


async def test_redis_evicting_at_a_tiny_maxmemory_mid_load(
    services: Services, http: aiohttp.ClientSession, settings: Settings, redis: aioredis.Redis
) -> None:
    """Redis at a limit below what it holds for three seconds: it evicts what it can
    (every key has a TTL) and refuses writes it cannot make room for. Claims are answered
    or refused with 503, never a 500, and end with the database's answer."""
    services.start_consumer()
    await services.start_gateway(**GATEWAY)
    load = await Load(services, http).start()
    evicted = []

    async def squeeze(window: Window) -> None:
        used = int((await redis.info("memory"))["used_memory"])
        await redis.config_set("maxmemory", max(used // 2, 1))
        window.hit()
        await asyncio.sleep(3)
        evicted.append(int((await redis.info("stats"))["evicted_keys"]))
        await redis.config_set("maxmemory", "256mb")

    answers, window = await faulted(load, squeeze)
    await verify(settings, load, answers)
    assert evicted[0] > 0, "nothing was evicted"
    assert len(window.reached(answers, delayed=False)) >= REACHED


async def test_an_idempotency_key_reused_for_another_coupon_after_redis_forgot_it(
    services: Services, http: aiohttp.ClientSession, settings: Settings, redis: aioredis.Redis
) -> None:
    """A key used for a claim on one coupon, Redis flushed (its fingerprint gone), then
    the same key for another coupon: the answer is 422 or the first claim's own answer,
    never a claim on the second coupon."""
    services.start_consumer()
    await services.start_gateway(**GATEWAY)
    first, other = (f"KEY_{uuid.uuid4().hex[:8]}_{i}" for i in range(2))
    await services.create_coupons(http, 5, first, other)
    key = {"Idempotency-Key": uuid.uuid4().hex}

    async def claim(coupon: str) -> tuple[int, dict[str, object]]:
        async with http.post(
            f"{services.base_url}/api/coupons/claim",
            json={"user_id": "alice", "coupon_name": coupon},
            headers=key,
        ) as r:
            return r.status, await r.json()

    granted = await claim(first)
    assert granted[0] == 200
    await redis.flushall()
    status, body = await claim(other)
    assert status == 422 or (status, body) == granted, (status, body)
    async with http.get(f"{services.base_url}/api/coupons/{other}") as r:
        coupon = await r.json()
    assert (coupon["remaining_amount"], coupon["claimed_by"]) == (5, [])


async def test_a_gateway_cut_from_redis_alone_mid_load(
    services: Services, http: aiohttp.ClientSession, settings: Settings
) -> None:
    """Only the gateway loses Redis, for three seconds (the consumer keeps it): claims
    are answered from the inbox, or 202 then followed, or refused with 503; every one
    ends with the database's answer."""
    proxy, url = Proxy.before(settings.redis_url)
    try:
        services.start_consumer()
        await services.start_gateway(redis_url=url, **GATEWAY)
        # No coupon sells out: every first claim needs its reply through Redis (a claim
        # on a sold-out coupon is answered by the gateway alone, and the cut would pass
        # it by), so the claims in flight at the cut are the ones it delays.
        load = await Load(services, http, ample=Load.coupons).start()

        async def cut(window: Window) -> None:
            proxy.cut()
            window.hit()
            await asyncio.sleep(3)
            proxy.restore()

        answers, window = await faulted(load, cut)
        await verify(settings, load, answers)
        assert len(window.reached(answers)) >= REACHED
    finally:
        proxy.close()


@pytest.mark.parametrize("alarm", ["memory", "disk"])
async def test_a_rabbitmq_resource_alarm_blocks_publishers_mid_load(
    services: Services,
    http: aiohttp.ClientSession,
    settings: Settings,
    restore: Stack,
    alarm: str,
) -> None:
    """A memory or disk alarm for four seconds: RabbitMQ blocks every publishing
    connection (the consumer's acknowledgements still flow). New claims are refused
    with 503 and a Retry-After once the publish times out or the breaker is open,
    never accepted into a blocked connection and lost; after the alarm, service as
    before."""
    broker = restore.rabbitmq
    assert broker is not None
    raise_alarm, clear_alarm = {
        "memory": (
            ("set_vm_memory_high_watermark", "absolute", "1"),
            ("set_vm_memory_high_watermark", "0.4"),
        ),
        "disk": (("set_disk_free_limit", "1000000GB"), ("set_disk_free_limit", "50MB")),
    }[alarm]
    services.start_consumer()
    await services.start_gateway(publish_timeout_seconds=1, **GATEWAY)
    load = await Load(services, http).start()

    async def alarmed(window: Window) -> None:
        try:
            await asyncio.to_thread(broker.ctl, *raise_alarm)
            await until_alarm(broker, alarm, True)
            window.hit()
            await asyncio.sleep(4)
        finally:
            await asyncio.to_thread(broker.ctl, *clear_alarm)
        await until_alarm(broker, alarm, False)

    answers, window = await faulted(load, alarmed)
    await verify(settings, load, answers)
    refused = [a for a in answers if 503 in a.seen and a.sent_at < window.end]
    assert len(refused) >= REACHED, f"only {len(refused)} claims met the alarm"


async def until_alarm(broker: RabbitMQ, alarm: str, raised: bool, timeout: float = 30) -> None:
    """Until the node reports the alarm raised (or cleared), in its management API."""
    field = {"memory": "mem_alarm", "disk": "disk_free_alarm"}[alarm]
    auth = {"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="}  # guest:guest
    async with aiohttp.ClientSession(headers=auth) as http, asyncio.timeout(timeout):
        while True:
            async with http.get(f"{broker.management_url}api/nodes") as r:
                nodes = await r.json()
            if all(node.get(field) is raised for node in nodes):
                return
            await asyncio.sleep(0.2)
