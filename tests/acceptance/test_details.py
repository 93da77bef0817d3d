"""Promises of the README that no other test pins down."""

from __future__ import annotations

import asyncio
import re
import urllib.parse
import uuid

import aiohttp

from flashclaim.core.policies import PRIORITY, policies
from flashclaim.core.settings import Settings
from tests.acceptance.conftest import Services, free_port
from tests.acceptance.test_contract import call, claim, create
from tests.proxy import Proxy


async def test_error_bodies_name_the_claim(
    api: Services, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    await create(http, api, coupon_name, 1)
    assert (await claim(http, api, "alice", coupon_name))[0] == 200
    for user, coupon, status in (
        ("alice", coupon_name, 409),
        ("bob", coupon_name, 400),
        ("bob", f"NOPE_{coupon_name}", 404),
    ):
        got, body, _ = await claim(http, api, user, coupon)
        assert got == status, body
        assert (body["user_id"], body["coupon_name"]) == (user, coupon)
        uuid.UUID(body["request_id"])
        assert body["error"] and body["code"]


async def test_request_id_header_is_echoed_when_valid_and_replaced_when_not(
    api: Services, http: aiohttp.ClientSession
) -> None:
    _, _, headers = await call(
        http, "GET", f"{api.base_url}/healthz", headers={"X-Request-Id": "abc-1.2_3"}
    )
    assert headers["X-Request-Id"] == "abc-1.2_3"
    for bad in ("has space", "x" * 129, "semi;colon"):
        _, _, headers = await call(
            http, "GET", f"{api.base_url}/healthz", headers={"X-Request-Id": bad}
        )
        assert headers["X-Request-Id"] != bad
        assert len(headers["X-Request-Id"]) == 32
    _, _, one = await call(http, "GET", f"{api.base_url}/healthz")
    _, _, two = await call(http, "GET", f"{api.base_url}/healthz")
    assert one["X-Request-Id"] != two["X-Request-Id"]


async def test_claim_body_cap_and_the_amount_maximum(
    api: Services, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    payload = b'{"user_id": "u", "coupon_name": "' + b"c" * 70_000 + b'"}'
    status, body, _ = await call(http, "POST", f"{api.base_url}/api/coupons/claim", data=payload)
    assert (status, body["code"]) == (413, "request_entity_too_large")
    status, body, _ = await call(
        http, "POST", f"{api.base_url}/api/coupons", json={"name": coupon_name, "amount": 2**31 - 1}
    )
    assert (status, body["remaining_amount"]) == (201, 2**31 - 1)
    status, body, _ = await call(
        http,
        "POST",
        f"{api.base_url}/api/coupons",
        json={"name": f"{coupon_name}_B", "amount": 2**31},
    )
    assert (status, body["code"]) == (400, "invalid_request")


async def test_idempotent_retries_across_gateway_workers_are_one_claim(
    services: Services, settings: Settings, coupon_name: str
) -> None:
    """Each retry on its own connection, so the kernel spreads them over both worker
    processes: they share the secret, so they derive one request id."""
    services.start_consumer()
    await services.start_gateway(gateway_workers=2, idempotency_secret="w" * 32)
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}

    async def fresh_connection_claim() -> tuple[int, dict[str, object]]:
        async with aiohttp.ClientSession() as http:
            status, body, _ = await claim(http, services, "alice", coupon_name, headers=key)
            return status, body

    async with aiohttp.ClientSession() as http:
        await create(http, services, coupon_name, 5)
        answers = await asyncio.gather(*(fresh_connection_claim() for _ in range(16)))
        assert {(s, b["request_id"]) for s, b in answers} == {(200, answers[0][1]["request_id"])}
        _, body, _ = await call(http, "GET", f"{services.base_url}/api/coupons/{coupon_name}")
        assert (body["remaining_amount"], body["claimed_by"]) == (4, ["alice"])


async def test_readiness_names_each_dependency_that_is_down(
    services: Services, http: aiohttp.ClientSession, settings: Settings
) -> None:
    broker, amqp_url = Proxy.before(settings.amqp_url)
    try:
        await services.start_gateway(
            amqp_url=amqp_url,
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
        )
        status, body, _ = await call(http, "GET", f"{services.base_url}/readyz")
        assert status == 503
        assert body["checks"]["database"] == "ok"
        assert body["checks"]["broker"] == "ok"
        assert body["checks"]["redis"] != "ok"
        broker.cut()
        for _ in range(50):
            status, body, _ = await call(http, "GET", f"{services.base_url}/readyz")
            if body["checks"]["broker"] != "ok":
                break
            await asyncio.sleep(0.1)
        assert (status, body["checks"]["broker"]) == (503, "broker is unavailable: not connected")
        # Claims are refused at once while the broker is away, not left to time out.
        status, body, headers = await claim(http, services, "alice", "ANY")
        assert (status, body["code"]) == (503, "service_unavailable")
        assert int(headers["Retry-After"]) >= 1
    finally:
        broker.close()


async def test_a_reconnection_to_a_broker_that_never_answers_is_abandoned_and_tried_again(
    services: Services, http: aiohttp.ClientSession, settings: Settings
) -> None:
    """The broker goes away, then comes back first as one that takes connections and
    says nothing (booting): the gateway's reconnection attempt gives up after its
    timeout and the next one, to the broker serving again, succeeds."""
    broker, amqp_url = Proxy.before(settings.amqp_url)
    try:
        await services.start_gateway(amqp_url=amqp_url)
        broker.cut()
        broker.black_hole()  # the reconnection attempt is taken and never answered
        await asyncio.sleep(3)
        broker.restore()
        ready = False
        for _ in range(300):  # the attempt's timeout (10 s), then a new attempt
            _, body, _ = await call(http, "GET", f"{services.base_url}/readyz")
            if body["checks"]["broker"] == "ok":
                ready = True
                break
            await asyncio.sleep(0.1)
        assert ready, body
    finally:
        broker.close()


async def test_circuit_breaker_opens_on_a_hung_broker_and_closes_after_recovery(
    services: Services, http: aiohttp.ClientSession, settings: Settings, coupon_name: str
) -> None:
    """The broker connection stays up but nothing comes back (no confirms): claims time
    out into 503; after BREAKER_FAILURE_THRESHOLD of them the breaker answers 503 at
    once, and once the broker answers again and the recovery time has passed, claims
    go through."""
    broker, amqp_url = Proxy.before(settings.amqp_url)
    try:
        services.start_consumer()  # straight to the broker
        await services.start_gateway(
            amqp_url=amqp_url,
            publish_timeout_seconds=0.5,
            breaker_failure_threshold=3,
            breaker_recovery_seconds=2,
        )
        await create(http, services, coupon_name, 100)
        broker.stall()
        loop = asyncio.get_running_loop()
        for i in range(3):  # each waits for its confirm, then gives up
            started = loop.time()
            status, body, _ = await claim(http, services, f"timed_out_{i}", coupon_name)
            assert (status, body["code"]) == (503, "service_unavailable")
            assert loop.time() - started >= 0.4
        started = loop.time()
        status, body, headers = await claim(http, services, "refused", coupon_name)
        assert (status, body["code"]) == (503, "service_unavailable")
        assert "circuit open" in body["error"]
        assert loop.time() - started < 0.3  # at once: the breaker is open
        assert int(headers["Retry-After"]) >= 1
        broker.flow()
        # Refused at once until the recovery time has passed, then a trial goes through.
        for _ in range(60):
            status, body, _ = await claim(http, services, "after", coupon_name)
            if status != 503:
                break
            assert "circuit open" in body["error"], body
            await asyncio.sleep(0.1)
        assert status == 200, body
        assert loop.time() - started >= 1.5  # not long before BREAKER_RECOVERY_SECONDS (2)
    finally:
        broker.close()


async def test_a_claim_whose_confirm_timed_out_is_still_one_claim(
    services: Services, http: aiohttp.ClientSession, settings: Settings, coupon_name: str
) -> None:
    """No confirm within PUBLISH_TIMEOUT_SECONDS (the breaker far from open): 503 after
    that wait, not a hang. The broker may still store the command; the README says so,
    and a retry with the same Idempotency-Key is answered as that one claim."""
    broker, amqp_url = Proxy.before(settings.amqp_url)
    try:
        services.start_consumer()  # straight to the broker
        await services.start_gateway(
            amqp_url=amqp_url, publish_timeout_seconds=0.5, breaker_failure_threshold=100
        )
        await create(http, services, coupon_name, 5)
        key = {"Idempotency-Key": uuid.uuid4().hex}
        broker.stall()
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, body, _ = await claim(http, services, "alice", coupon_name, headers=key)
        assert (status, body["code"]) == (503, "service_unavailable")
        assert "circuit open" not in body["error"]
        assert 0.4 <= loop.time() - started < 3
        request_id = body["request_id"]
        broker.flow()  # what the broker was sent arrives late, and is applied
        for _ in range(100):
            status, answer, _ = await call(
                http, "GET", f"{services.base_url}/api/claims/{request_id}"
            )
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert (status, answer["request_id"]) == (200, request_id), answer
        status, retried, _ = await claim(http, services, "alice", coupon_name, headers=key)
        assert (status, retried) == (200, answer)
        status, coupon, _ = await call(
            http, "GET", f"{services.base_url}/api/coupons/{coupon_name}"
        )
        assert coupon["remaining_amount"] == 4
    finally:
        broker.close()


async def test_a_refused_claim_is_503_and_the_next_goes_out_on_a_new_channel(
    services: Services, http: aiohttp.ClientSession, settings: Settings, coupon_name: str
) -> None:
    """The broker nacks a claim (here an operator's policy limits the command queues to
    one waiting message, with no consumer to take it): 503, and the gateway opens a new
    channel for the claims after it. RabbitMQ 3.10 can keep refusing a channel that a
    quorum queue once refused, after the queue takes messages again (a queue that lost
    its leader does this to a channel that published during the election): a new
    channel is asked afresh."""
    await services.start_gateway(
        instance_id=f"gateway-{settings.namespace}",
        breaker_failure_threshold=100,
        claim_wait_seconds=0.2,
    )
    await create(http, services, coupon_name, 10)
    ns = settings.namespace
    api = urllib.parse.urlsplit(settings.amqp_management_url)
    base = f"http://{api.hostname}:{api.port}/api"
    auth = {"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="}  # guest:guest

    async def channels() -> set[int]:
        """The numbers of the gateway's open channels, as the broker lists them."""
        async with http.get(f"{base}/connections", headers=auth) as r:
            named = [
                c["name"]
                for c in await r.json()
                if ns in c["client_properties"].get("connection_name", "")
            ]
        if len(named) != 1:  # not listed yet
            return set()
        path = urllib.parse.quote(named[0], safe="")
        async with http.get(f"{base}/connections/{path}/channels", headers=auth) as r:
            return {c["number"] for c in await r.json()}

    async def eventually(expected: set[int]) -> None:
        for _ in range(50):  # the broker's lists refresh every second here
            if await channels() == expected:
                return
            await asyncio.sleep(0.1)
        assert await channels() == expected

    await eventually({1})
    policy = f"{base}/policies/%2F/{ns}.full"
    full = {
        "pattern": rf"^{re.escape(ns)}\.claims\.[0-9]+$",
        "apply-to": "queues",
        "priority": PRIORITY + 1,  # over flashclaim's own
        "definition": {**policies(settings.topology(), 3)[0].definition, "max-length": 1},
    }
    async with http.put(policy, json=full, headers=auth) as r:
        assert r.status in (201, 204), await r.text()
    try:
        for i in range(50):  # 202 (queued, no consumer) until the queue is full
            status, body, _ = await claim(http, services, f"early_{i}", coupon_name)
            if status == 503:
                break
            assert status == 202, body
            await asyncio.sleep(0.1)
        assert (status, body["code"]) == (503, "service_unavailable"), body
        assert "claim not accepted by the broker" in body["error"]
        await eventually({2})  # a new channel; the refused one closed
    finally:
        async with http.delete(policy, headers=auth) as r:
            assert r.status == 204, await r.text()
        async with http.delete(f"{base}/queues/%2F/{ns}.claims.0/contents", headers=auth):
            pass
    for i in range(50):
        status, body, _ = await claim(http, services, f"after_{i}", coupon_name)
        if status != 503:
            break
        await asyncio.sleep(0.1)
    assert status == 202, body  # accepted (nothing consumes here)
    async with http.get(f"{services.base_url}/metrics") as r:
        figures = await r.text()
    refused = re.search(r'flashclaim_publish_failures_total\{reason="refused"\} (\S+)', figures)
    assert refused is not None and float(refused[1]) >= 1, figures
