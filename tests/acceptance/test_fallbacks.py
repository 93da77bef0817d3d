"""Results survive Redis losing them: the inbox in PostgreSQL still answers."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import redis.asyncio as aioredis

from flashclaim.core.results import ResultStore
from tests.acceptance.conftest import Services, until_sold_out_in_gateway
from tests.acceptance.test_contract import call, claim, create


async def forget_in_redis(api: Services, request_id: str) -> None:
    client = aioredis.from_url(api.settings.redis_url)
    store = ResultStore(client, api.settings.namespace, 60)
    await client.delete(store.result_key(uuid.UUID(request_id)))
    assert await store.get(uuid.UUID(request_id)) is None
    await client.aclose()


async def test_claim_lookup_falls_back_to_the_inbox(
    api: Services, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    await create(http, api, coupon_name, 1)
    status, body, _ = await claim(http, api, "alice", coupon_name)
    await forget_in_redis(api, body["request_id"])
    again, recorded, _ = await call(http, "GET", f"{api.base_url}/api/claims/{body['request_id']}")
    assert (again, recorded) == (status, body)


async def test_idempotent_retry_is_answered_from_the_inbox_when_redis_forgot(
    api: Services, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    await create(http, api, coupon_name, 5)
    key = {"Idempotency-Key": str(uuid.uuid4())}
    first = await claim(http, api, "alice", coupon_name, headers=key)
    await forget_in_redis(api, first[1]["request_id"])
    again = await claim(http, api, "alice", coupon_name, headers=key)
    assert first[0] == 200
    assert (again[0], again[1]) == (first[0], first[1])
    _, coupon, _ = await call(http, "GET", f"{api.base_url}/api/coupons/{coupon_name}")
    assert (coupon["remaining_amount"], coupon["claimed_by"]) == (4, ["alice"])


async def test_answers_given_in_the_gateway_are_kept_briefly_and_never_overwrite(
    services: Services, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    """After a sell-out, claims are answered at HTTP speed; each answer is kept only
    GATEWAY_ANSWER_TTL_SECONDS (not the 24 h of a real result), so a storm of them cannot
    fill Redis, and none replaces a result the consumer recorded."""
    services.start_consumer()
    await services.start_gateway(gateway_answer_ttl_seconds=30)
    await create(http, services, coupon_name, 1)
    winner = await claim(http, services, "alice", coupon_name)
    assert (await claim(http, services, "bob", coupon_name))[1]["code"] == "out_of_stock"
    await until_sold_out_in_gateway(http, services, coupon_name)
    losers = await asyncio.gather(*(claim(http, services, f"u{i}", coupon_name) for i in range(50)))
    again = await claim(http, services, "alice", coupon_name)
    assert {s for s, _, _ in losers} == {400} and again[0] == 409
    client = aioredis.from_url(services.settings.redis_url)
    store = ResultStore(client, services.settings.namespace, 60)
    try:
        for _, body, _ in [*losers, again]:
            rid = uuid.UUID(body["request_id"])
            # Stored in the background once the answer is out: wait for it, briefly.
            for _ in range(50):
                ttl = await client.ttl(store.gateway_answer_key(rid))
                if ttl != -2:
                    break
                await asyncio.sleep(0.05)
            assert 0 < ttl <= 30, body
            assert not await client.exists(store.result_key(rid))
            status, polled, _ = await call(http, "GET", f"{services.base_url}/api/claims/{rid}")
            assert (status, polled) == (400 if body["user_id"] != "alice" else 409, body)
        rid = uuid.UUID(winner[1]["request_id"])
        assert await client.ttl(store.result_key(rid)) > 30
    finally:
        await client.aclose()
