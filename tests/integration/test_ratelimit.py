"""The token bucket against a real Redis: burst, refill, one bucket per client, and
requests let through when Redis is away."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from flashclaim.core.errors import RateLimited
from flashclaim.core.settings import Settings
from gateway.ratelimit import RateLimiter


async def allowed(limiter: RateLimiter, client: str, times: int) -> int:
    passed = 0
    for _ in range(times):
        try:
            await limiter.check(client)
        except RateLimited:
            continue
        passed += 1
    return passed


async def test_burst_then_refill_per_client(settings: Settings) -> None:
    client = aioredis.from_url(settings.redis_url)
    try:
        limiter = RateLimiter(client, settings.namespace, per_second=5, burst=3)
        assert await allowed(limiter, "a", 5) == 3
        with pytest.raises(RateLimited) as refused:
            await limiter.check("a")
        assert refused.value.retry_after == 1  # a token every 0.2 s, rounded up
        assert await allowed(limiter, "b", 3) == 3  # another client, another bucket
        await asyncio.sleep(0.45)  # two tokens' worth
        assert await allowed(limiter, "a", 3) == 2
        # The bucket's key expires once it would be full again: no key per client kept.
        ttl = await client.pttl(f"{settings.namespace}:ratelimit:a")
        assert 0 < ttl <= 3 * 1000 / 5 + 1000
    finally:
        await client.aclose()


async def test_burst_defaults_to_one_second_of_rate(settings: Settings) -> None:
    client = aioredis.from_url(settings.redis_url)
    try:
        assert await allowed(RateLimiter(client, settings.namespace, 2.5, 0), "c", 10) == 3
    finally:
        await client.aclose()


async def test_requests_pass_when_redis_is_away(settings: Settings) -> None:
    client = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        assert await allowed(RateLimiter(client, settings.namespace, 1, 1), "d", 5) == 5
    finally:
        await client.aclose()
