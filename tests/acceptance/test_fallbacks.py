"""Results survive Redis losing them: the inbox in PostgreSQL still answers."""

from __future__ import annotations

import uuid

import aiohttp
import redis.asyncio as aioredis

from flashclaim.results import ResultStore
from tests.acceptance.conftest import Services
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
