"""The REST contract over HTTP, against real gateway and consumer processes."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aio_pika
import aiohttp
import pytest

from flashclaim.core.settings import Settings
from tests.acceptance.conftest import Services


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, Any, Any]:
    async with http.request(method, url, **kw) as response:
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json(), response.headers


async def until_answered(
    http: aiohttp.ClientSession, url: str, timeout: float = 20, **kw: Any
) -> dict[str, Any]:
    """The final answer of a claim (``url``: its /api/claims/{id}), asked again while it
    is on its way (202); it must be a grant."""
    async with asyncio.timeout(timeout):
        while True:
            status, body, _ = await call(http, "GET", url, **kw)
            if status != 202:
                assert status == 200, body
                return dict(body)
            await asyncio.sleep(0.1)


async def create(http: aiohttp.ClientSession, api: Services, name: str, amount: int) -> None:
    status, body, _ = await call(
        http, "POST", f"{api.base_url}/api/coupons", json={"name": name, "amount": amount}
    )
    assert status == 201, body


async def claim(
    http: aiohttp.ClientSession, api: Services, user: str, coupon: str, **kw: Any
) -> tuple[int, Any, Any]:
    return await call(
        http,
        "POST",
        f"{api.base_url}/api/coupons/claim",
        json={"user_id": user, "coupon_name": coupon},
        **kw,
    )


async def test_create_coupon_then_conflict(
    api: Services, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    url = f"{api.base_url}/api/coupons"
    status, body, headers = await call(http, "POST", url, json={"name": coupon_name, "amount": 3})
    assert status == 201
    assert body == {"name": coupon_name, "amount": 3, "remaining_amount": 3, "claimed_by": []}
    assert headers["Location"] == f"/api/coupons/{coupon_name}"
    status, body, _ = await call(http, "POST", url, json={"name": coupon_name, "amount": 9})
    assert (status, body["code"]) == (409, "coupon_exists")
    status, body, _ = await call(http, "GET", f"{url}/{coupon_name}")
    assert (status, body["amount"]) == (200, 3)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"[]",
        b'"text"',
        b"null",
        b"{}",
        b'{"amount": 5}',
        b'{"name": "", "amount": 5}',
        b'{"name": "   ", "amount": 5}',
        b'{"name": 42, "amount": 5}',
        b'{"name": "' + b"x" * 129 + b'", "amount": 5}',
        b'{"name": "OK"}',
        b'{"name": "OK", "amount": 0}',
        b'{"name": "OK", "amount": -1}',
        b'{"name": "OK", "amount": 1.5}',
        b'{"name": "OK", "amount": 2.0}',
        b'{"name": "OK", "amount": "5"}',
        b'{"name": "OK", "amount": true}',
        b'{"name": "OK", "amount": null}',
        b'{"name": "OK", "amount": 99999999999}',
        b'{"name": "OK", "amount": 1e400}',
        b'{"name": "a\\u0000b", "amount": 1}',
    ],
)
async def test_create_coupon_rejects_invalid_input(
    api: Services, http: aiohttp.ClientSession, payload: bytes
) -> None:
    status, body, _ = await call(
        http,
        "POST",
        f"{api.base_url}/api/coupons",
        data=payload,
        headers={"Content-Type": "application/json"},
    )
    assert status == 400, body
    assert body["code"] == "invalid_request"
    assert body["error"]


async def test_oversized_body_is_413(api: Services, http: aiohttp.ClientSession) -> None:
    payload = b'{"name": "' + b"x" * 70_000 + b'", "amount": 1}'
    status, body, _ = await call(http, "POST", f"{api.base_url}/api/coupons", data=payload)
    assert status == 413
    assert body["code"]


async def test_unknown_route_and_method_answer_json(
    api: Services, http: aiohttp.ClientSession
) -> None:
    status, body, _ = await call(http, "GET", f"{api.base_url}/nope")
    assert (status, body["code"]) == (404, "not_found")
    status, body, headers = await call(http, "DELETE", f"{api.base_url}/api/coupons")
    assert status == 405
    assert "POST" in headers["Allow"]


async def test_get_coupon_lists_claimers_in_order_and_404s(
    api: Services, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    await create(http, api, coupon_name, 5)
    for user in ("carol", "alice", "bob"):
        status, body, _ = await claim(http, api, user, coupon_name)
        assert status == 200, body
    status, body, _ = await call(http, "GET", f"{api.base_url}/api/coupons/{coupon_name}")
    assert (status, body) == (
        200,
        {
            "name": coupon_name,
            "amount": 5,
            "remaining_amount": 2,
            "claimed_by": ["carol", "alice", "bob"],
        },
    )
    status, body, _ = await call(http, "GET", f"{api.base_url}/api/coupons/NOPE_{coupon_name}")
    assert (status, body["code"]) == (404, "coupon_not_found")


async def test_claim_answers(api: Services, http: aiohttp.ClientSession, coupon_name: str) -> None:
    await create(http, api, coupon_name, 1)
    status, body, _ = await claim(http, api, "user_12345", coupon_name)
    assert status == 200
    assert body["status"] == "claimed"
    assert (body["user_id"], body["coupon_name"]) == ("user_12345", coupon_name)
    uuid.UUID(body["request_id"])
    # Already holding: 409, and eligibility is checked before stock (now sold out).
    status, body, _ = await claim(http, api, "user_12345", coupon_name)
    assert (status, body["code"]) == (409, "already_claimed")
    status, body, _ = await claim(http, api, "someone_else", coupon_name)
    assert (status, body["code"]) == (400, "out_of_stock")
    status, body, _ = await claim(http, api, "user_12345", f"MISSING_{coupon_name}")
    assert (status, body["code"]) == (404, "coupon_not_found")


@pytest.mark.parametrize(
    "payload",
    [
        b"{}",
        b"[]",
        b"nope",
        b'{"user_id": "u"}',
        b'{"coupon_name": "c"}',
        b'{"user_id": "", "coupon_name": "c"}',
        b'{"user_id": 12345, "coupon_name": "c"}',
        b'{"user_id": "u", "coupon_name": null}',
        b'{"user_id": ["u"], "coupon_name": "c"}',
        b'{"user_id": "' + b"u" * 129 + b'", "coupon_name": "c"}',
    ],
)
async def test_claim_rejects_invalid_input(
    api: Services, http: aiohttp.ClientSession, payload: bytes
) -> None:
    status, body, _ = await call(http, "POST", f"{api.base_url}/api/coupons/claim", data=payload)
    assert (status, body["code"]) == (400, "invalid_request")


async def test_idempotency_key_replays_the_first_answer(
    api: Services, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    await create(http, api, coupon_name, 10)
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    answers = await asyncio.gather(
        *(claim(http, api, "alice", coupon_name, headers=key) for _ in range(5))
    )
    assert {(s, b["status"], b["request_id"]) for s, b, _ in answers} == {
        (200, "claimed", answers[0][1]["request_id"])
    }
    status, body, _ = await claim(http, api, "alice", coupon_name, headers=key)
    assert (status, body["request_id"]) == (200, answers[0][1]["request_id"])
    status, body, _ = await call(http, "GET", f"{api.base_url}/api/coupons/{coupon_name}")
    assert (body["remaining_amount"], body["claimed_by"]) == (9, ["alice"])
    # The same key for another claim of hers is refused, not silently answered.
    other = f"{coupon_name}_B"
    await create(http, api, other, 10)
    status, body, _ = await claim(http, api, "alice", other, headers=key)
    assert (status, body["code"]) == (422, "idempotency_key_reused")
    status, body, _ = await claim(
        http, api, "bob", coupon_name, headers={"Idempotency-Key": "x" * 300}
    )
    assert (status, body["code"]) == (400, "invalid_request")


async def test_claim_lookup_by_request_id(
    api: Services, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    await create(http, api, coupon_name, 1)
    status, body, _ = await claim(http, api, "alice", coupon_name)
    status2, body2, _ = await call(http, "GET", f"{api.base_url}/api/claims/{body['request_id']}")
    assert (status2, body2) == (status, body)
    status, body, _ = await call(http, "GET", f"{api.base_url}/api/claims/{uuid.uuid4()}")
    assert (status, body["code"]) == (404, "claim_not_found")
    status, body, _ = await call(http, "GET", f"{api.base_url}/api/claims/not-a-uuid")
    assert (status, body["code"]) == (404, "claim_not_found")


async def test_slow_result_answers_202_then_the_final_answer(
    services: Services, http: aiohttp.ClientSession, settings: Settings, coupon_name: str
) -> None:
    # No consumer yet: the claim waits in the queue and the client gets 202 + Location.
    await services.start_gateway(claim_wait_seconds=0.3)
    await create(http, services, coupon_name, 1)
    status, body, headers = await claim(http, services, "alice", coupon_name)
    assert (status, body["status"]) == (202, "pending")
    assert headers["Location"] == f"/api/claims/{body['request_id']}"
    status, polled, _ = await call(http, "GET", f"{services.base_url}{headers['Location']}")
    assert (status, polled["status"]) == (202, "pending")
    services.start_consumer()
    for _ in range(200):
        status, polled, _ = await call(http, "GET", f"{services.base_url}{headers['Location']}")
        if status != 202:
            break
        await asyncio.sleep(0.1)
    assert (status, polled["status"], polled["request_id"]) == (200, "claimed", body["request_id"])


async def test_broker_refusing_a_claim_answers_503_with_retry_after(
    services: Services, http: aiohttp.ClientSession, settings: Settings, coupon_name: str
) -> None:
    api = services  # a gateway of its own: this test removes its command queue
    await api.start_gateway()
    await create(http, api, coupon_name, 5)
    # With the command queue gone, the broker cannot route (store) the claim.
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        for queue in settings.topology().claims_queues:
            await channel.queue_delete(queue)
    status, body, headers = await claim(http, api, "alice", coupon_name)
    assert (status, body["code"]) == (503, "service_unavailable")
    assert int(headers["Retry-After"]) >= 1
    refused = body["request_id"]
    # A consumer (which declares the queues again) never sees the refused claim: it was
    # not accepted, so it is not applied, now or later. A claim made after it is.
    api.start_consumer()
    for _ in range(100):  # until the consumer has declared the queues again
        status, body, _ = await claim(http, api, "bob", coupon_name)
        if status != 503:
            break
        await asyncio.sleep(0.2)
    assert status == 200, body
    status, body, _ = await call(http, "GET", f"{api.base_url}/api/coupons/{coupon_name}")
    assert (body["remaining_amount"], body["claimed_by"]) == (4, ["bob"])
    status, body, _ = await call(http, "GET", f"{api.base_url}/api/claims/{refused}")
    assert (status, body["code"]) == (404, "claim_not_found")


async def test_health_and_readiness(api: Services, http: aiohttp.ClientSession) -> None:
    assert (await call(http, "GET", f"{api.base_url}/healthz"))[0] == 200
    status, body, _ = await call(http, "GET", f"{api.base_url}/readyz")
    assert (status, body["checks"]) == (200, {"database": "ok", "redis": "ok", "broker": "ok"})


async def test_database_unreachable_makes_reads_503_and_readiness_fail(
    services: Services, http: aiohttp.ClientSession
) -> None:
    dead_db = "postgresql://flashclaim@127.0.0.1:1/flashclaim?connect_timeout=1"
    await services.start_gateway(database_url=dead_db)
    status, body, _ = await call(http, "GET", f"{services.base_url}/readyz")
    assert (status, body["status"]) == (503, "unavailable")
    assert body["checks"]["database"] != "ok"
    assert body["checks"]["broker"] == "ok"
    status, body, headers = await call(http, "GET", f"{services.base_url}/api/coupons/X")
    assert (status, body["code"]) == (503, "service_unavailable")
    assert "Retry-After" in headers
