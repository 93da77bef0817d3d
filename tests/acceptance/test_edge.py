"""The edge (deploy/edge/haproxy.cfg, run as shipped by Debian's haproxy) in front of a
real gateway: a crowd beyond what it lets through is refused there (503 overloaded,
Retry-After, JSON like the gateway's), every claim it let through is decided and none it
refused is published; with no gateway behind it, its own errors are JSON 503s too."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import aiohttp
import pytest

from flashclaim.core.settings import Settings
from flashclaim.devtools import edge
from tests.acceptance.conftest import LOGS, Services, free_port
from tests.acceptance.test_overload import granted_users, slow_coupon  # noqa: F401 (a fixture)


@pytest.fixture
def front(settings: Settings, services: Services) -> Iterator[edge.Edge]:
    """The edge in front of ``services``' gateway, 20 requests on their way at most."""
    log = LOGS / f"{settings.namespace}-edge.log"
    with edge.running(
        free_port(), free_port(), f"127.0.0.1:{services.port}", log, in_flight=20
    ) as running:
        yield running


async def test_a_crowd_beyond_the_edge_is_refused_there_and_what_it_let_through_decided(
    services: Services,
    settings: Settings,
    http: aiohttp.ClientSession,
    front: edge.Edge,
    slow_coupon: str,  # noqa: F811
) -> None:
    """600 claims at 300 a second through the edge, for a coupon decided at 100 a second,
    the gateway's own overload limit off: past 20 claims on their way, the edge answers
    503 overloaded with Retry-After itself (no gateway's X-Request-Id); every claim it let
    through is granted, and no refused one is."""
    services.start_consumer()
    health = front.metrics_url.replace("/metrics", "/healthz")
    async with http.get(health) as r:
        assert r.status == 503  # no gateway behind it yet
    await services.start_gateway(claim_wait_seconds=30)
    # Healthy once its check of the gateway's /healthz passed (every 2 s).
    for _ in range(100):
        async with http.get(health) as r:
            if r.status == 200:
                break
        await asyncio.sleep(0.1)
    assert r.status == 200
    url = f"{front.url}/api/coupons/claim"
    answers: dict[str, tuple[int, str, str | None, bool]] = {}

    async def claim(user: str) -> None:
        async with http.post(url, json={"user_id": user, "coupon_name": slow_coupon}) as r:
            body = await r.json()
            answers[user] = (
                r.status,
                body.get("code", ""),
                r.headers.get("Retry-After"),
                "X-Request-Id" in r.headers,
            )

    started = time.monotonic()
    tasks = []
    for i in range(600):
        tasks.append(asyncio.create_task(claim(f"edge_{i:04d}")))
        await asyncio.sleep(max(0.0, started + i / 300 - time.monotonic()))
    await asyncio.gather(*tasks)

    statuses = Counter((status, code) for status, code, *_ in answers.values())
    refused = {u for u, (status, *_) in answers.items() if status == 503}
    let_in = {u for u, (status, *_) in answers.items() if status == 200}
    assert let_in | refused == set(answers), statuses
    assert statuses[(503, "overloaded")] == len(refused) > 100, statuses
    # Refused by the edge itself, before any gateway saw them; a retry waits a second.
    assert {answers[u][2:] for u in refused} == {("1", False)}
    assert len(let_in) >= 20
    for _ in range(300):
        if granted_users(settings, slow_coupon) >= let_in:
            break
        await asyncio.sleep(0.1)
    assert granted_users(settings, slow_coupon) == let_in

    # The crowd has gone: claims go through again, and the edge's queue is empty.
    for i in range(10):
        await claim(f"after_{i}")
    assert [answers[f"after_{i}"][0] for i in range(10)] == [200] * 10
    async with http.get(front.metrics_url) as r:
        assert r.status == 200
        page = await r.text()
    assert 'haproxy_backend_current_queue{proxy="gateways"} 0' in page


async def test_with_no_gateway_behind_it_the_edge_answers_json_503s(
    settings: Settings, http: aiohttp.ClientSession
) -> None:
    """The gateways away (nothing listens where the edge sends): a claim and a read get
    503 service_unavailable, JSON, with Retry-After, at once; the edge's health check
    fails; an unknown path of its metrics port gets a JSON 404."""
    away = f"127.0.0.1:{free_port()}"
    log = LOGS / f"{settings.namespace}-edge-alone.log"
    with edge.running(free_port(), free_port(), away, log) as alone:
        started = time.monotonic()
        async with http.post(
            f"{alone.url}/api/coupons/claim", json={"user_id": "u", "coupon_name": "C"}
        ) as r:
            assert (r.status, (await r.json())["code"]) == (503, "service_unavailable")
            assert r.headers["Retry-After"] == "1"
        async with http.get(f"{alone.url}/api/claims/00000000-0000-0000-0000-000000000000") as r:
            assert (r.status, (await r.json())["code"]) == (503, "service_unavailable")
        assert time.monotonic() - started < 5
        async with http.get(alone.metrics_url.replace("/metrics", "/healthz")) as r:
            assert r.status == 503
        async with http.get(alone.metrics_url.replace("/metrics", "/other")) as r:
            assert (r.status, (await r.json())["code"]) == (404, "not_found")
