"""Idempotency-Key: scoped to the client's claim, unguessable, first answer wins."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp

from flashclaim.core.settings import Settings
from tests.acceptance.conftest import Services, until_sold_out_in_gateway
from tests.acceptance.test_contract import call, claim, create, until_answered


async def test_same_key_from_two_users_is_two_claims(
    api: Services, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    await create(http, api, coupon_name, 10)
    key = {"Idempotency-Key": "order-1"}  # a key anyone might pick
    alice, bob = await asyncio.gather(
        claim(http, api, "alice", coupon_name, headers=key),
        claim(http, api, "bob", coupon_name, headers=key),
    )
    assert (alice[0], bob[0]) == (200, 200), (alice[1], bob[1])
    assert alice[1]["request_id"] != bob[1]["request_id"]
    _status, body, _ = await call(http, "GET", f"{api.base_url}/api/coupons/{coupon_name}")
    assert sorted(body["claimed_by"]) == ["alice", "bob"]
    # Each retry gets its own first answer back, and nothing is applied twice.
    again = await claim(http, api, "bob", coupon_name, headers=key)
    assert (again[0], again[1]["request_id"]) == (200, bob[1]["request_id"])
    _, body, _ = await call(http, "GET", f"{api.base_url}/api/coupons/{coupon_name}")
    assert body["remaining_amount"] == 8


async def test_request_ids_cannot_be_computed_from_a_key(
    services: Services, http: aiohttp.ClientSession, settings: Settings, coupon_name: str
) -> None:
    """The id is an HMAC under the deployment's secret: gateways sharing the secret
    agree on it (a retry may reach any of them); nobody without it can derive it."""
    services.start_consumer()
    first = await services.start_gateway(idempotency_secret="s" * 32)
    await create(http, services, coupon_name, 10)
    key = {"Idempotency-Key": "order-7"}
    status, body, _ = await claim(http, services, "alice", coupon_name, headers=key)
    assert status == 200
    rid = uuid.UUID(body["request_id"])
    assert rid not in (uuid.uuid5(ns, "order-7") for ns in (uuid.NAMESPACE_URL, _OLD_NAMESPACE))
    # Another gateway process with the same secret: same id, first answer replayed.
    first.terminate()
    await asyncio.to_thread(first.wait, 15)
    await services.start_gateway(idempotency_secret="s" * 32)
    status, body, _ = await claim(http, services, "alice", coupon_name, headers=key)
    assert (status, body["request_id"]) == (200, str(rid))
    services.stop()
    # A deployment with another secret derives other ids from the same keys.
    services.start_consumer()
    await services.start_gateway(idempotency_secret="t" * 32)
    status, body, _ = await claim(http, services, "alice", coupon_name, headers=key)
    assert body["request_id"] != str(rid)
    assert (status, body["code"]) == (409, "already_claimed")


_OLD_NAMESPACE = uuid.UUID("6f1c1c36-5b8e-4a53-9a55-0c56f1a4b7e2")


async def test_reusing_a_key_for_another_coupon_while_the_first_is_in_flight_is_422(
    services: Services,
    http: aiohttp.ClientSession,
    coupon_name: str,
    exploding_user: str,
) -> None:
    """The first claim cannot be applied yet (the database refuses it for now); the
    same key for another coupon, even one the gateway knows is sold out (answered
    without a round trip), is refused and leaves the first claim's record alone."""
    services.start_consumer()
    await services.start_gateway(claim_wait_seconds=0.5)
    sold_out = f"{coupon_name}_SOLD"
    await create(http, services, coupon_name, 5)
    await create(http, services, sold_out, 1)
    # The consumer may still be starting: a 202 is followed to carol's grant.
    status, body, _ = await claim(http, services, "carol", sold_out)
    if status == 202:
        body = await until_answered(http, f"{services.base_url}/api/claims/{body['request_id']}")
    assert status in (200, 202), body
    assert (await claim(http, services, "dave", sold_out))[1]["code"] == "out_of_stock"
    await until_sold_out_in_gateway(http, services, sold_out)
    status, body, _ = await claim(http, services, "erin", sold_out)
    assert (status, body["code"]) == (400, "out_of_stock")

    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    status, first, _ = await claim(http, services, exploding_user, coupon_name, headers=key)
    assert (status, first["status"]) == (202, "pending")
    for other in (sold_out, f"{coupon_name}_NONE"):
        status, body, _ = await claim(http, services, exploding_user, other, headers=key)
        assert (status, body["code"]) == (422, "idempotency_key_reused"), body
    # The same key and body is the same claim: still pending, same id.
    status, body, _ = await claim(http, services, exploding_user, coupon_name, headers=key)
    assert (status, body["request_id"]) == (202, first["request_id"])
    status, body, _ = await call(
        http, "GET", f"{services.base_url}/api/claims/{first['request_id']}"
    )
    assert status == 202, body
