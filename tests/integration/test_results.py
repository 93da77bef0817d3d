"""Results in Redis across an upgrade: what the release before wrote is still read."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping

import orjson
import pytest
import redis.asyncio as aioredis

from flashclaim.core.messages import ClaimCommand, ClaimResult, Outcome
from flashclaim.core.results import ResultStore
from flashclaim.core.settings import Settings


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[ResultStore]:
    client = aioredis.from_url(settings.redis_url)
    yield ResultStore(client, settings.namespace, 60, 30)
    await client.aclose()


def older_form(result: ClaimResult, status: int, body: Mapping[str, object]) -> bytes:
    """A result as the release before stored it: an HTTP answer."""
    return orjson.dumps({"request_id": str(result.request_id), "status": status, "body": body})


async def test_results_and_answers_written_by_the_release_before_are_read(
    store: ResultStore,
) -> None:
    claimed = ClaimResult.of(ClaimCommand(uuid.uuid4(), "alice", "PROMO"), Outcome.CLAIMED)
    await store.redis.set(
        store.result_key(claimed.request_id),
        older_form(claimed, 200, {"status": "claimed", "user_id": "alice", "coupon_name": "PROMO"}),
    )
    assert await store.get(claimed.request_id) == claimed
    sold_out = ClaimResult.of(ClaimCommand(uuid.uuid4(), "bob", "PROMO"), Outcome.OUT_OF_STOCK)
    body = {
        "code": "out_of_stock",
        "error": "coupon is out of stock",
        "user_id": "bob",
        "coupon_name": "PROMO",
    }
    await store.redis.set(
        store.legacy_gateway_answer_key(sold_out.request_id), older_form(sold_out, 400, body)
    )
    assert await store.get(sold_out.request_id) == sold_out


async def test_the_consumers_result_wins_over_the_gateways_answers(store: ResultStore) -> None:
    command = ClaimCommand(uuid.uuid4(), "carol", "PROMO")
    given = ClaimResult.of(command, Outcome.OUT_OF_STOCK)
    await store.redis.set(store.legacy_gateway_answer_key(command.request_id), b"not read")
    await store.store_gateway_answers([given])
    assert await store.get(command.request_id) == given  # the new key before the old one
    assert 0 < await store.redis.ttl(store.gateway_answer_key(command.request_id)) <= 30
    applied = ClaimResult.of(command, Outcome.CLAIMED)
    await store.publish([(applied, None)])
    assert await store.get(command.request_id) == applied
