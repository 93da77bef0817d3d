"""A crowd bigger than the pipeline decides: the claims beyond it are refused before they
are published (503 overloaded, Retry-After: gateway/overload.py), the ones let in are
decided, and the command queues hold a bounded number of bytes, past which the broker's
refusal is a 503 too (flashclaim/core/policies.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import aiohttp
import psycopg
import pytest

from flashclaim.core.settings import Settings
from tests.acceptance.conftest import Services
from tests.conftest import create_coupon_row


def granted_users(settings: Settings, coupon: str) -> set[str]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute("SELECT user_id FROM claims WHERE coupon_name = %s", (coupon,))
        return {str(user) for (user,) in rows}


@pytest.fixture
def slow_coupon(settings: Settings) -> Iterator[str]:
    """A coupon whose claims the database writes at 100 a second at most (10 ms each, by
    a trigger): the consumers' capacity for it, far below what the test sends."""
    coupon = f"SLOW_{uuid.uuid4().hex[:8]}"
    trigger = f"slow_{coupon.lower()}"
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(f"""
            CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_sleep(0.01); RETURN NEW; END $$;
            CREATE TRIGGER {trigger} BEFORE INSERT ON claims FOR EACH ROW
            WHEN (NEW.coupon_name = '{coupon}') EXECUTE FUNCTION {trigger}();
        """)
    create_coupon_row(settings.database_url, coupon, 1_000_000)
    yield coupon
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(
            f"DROP TRIGGER IF EXISTS {trigger} ON claims; DROP FUNCTION IF EXISTS {trigger}();"
        )


async def test_a_crowd_beyond_capacity_is_refused_at_once_and_the_rest_decided(
    services: Services, settings: Settings, http: aiohttp.ClientSession, slow_coupon: str
) -> None:
    """1,500 claims at 500 a second for a coupon the consumer decides at 100 a second:
    once the claims on their way are more than the results of the last second times the
    target, new claims get 503 overloaded with a Retry-After and are never published;
    every claim let in is decided (granted, in the database, exactly); when the load has
    gone, claims are let in again."""
    services.start_consumer()
    await services.start_gateway(overload_wait_seconds=0.3, claim_wait_seconds=30)
    url = f"{services.base_url}/api/coupons/claim"
    answers: dict[str, tuple[int, str, str | None]] = {}
    gate = asyncio.Semaphore(1000)

    async def claim(user: str) -> None:
        async with gate, http.post(url, json={"user_id": user, "coupon_name": slow_coupon}) as r:
            body = await r.json()
            answers[user] = (r.status, body.get("code", ""), r.headers.get("Retry-After"))

    malformed: list[tuple[int, str]] = []

    async def claim_unreadable() -> None:
        """A claim whose body is not JSON: refused at the door (503) while the limit is
        reached, before its body is read; else 400."""
        async with gate, http.post(url, data=b"not json") as r:
            malformed.append((r.status, (await r.json()).get("code", "")))

    started = time.monotonic()
    tasks = []
    for i in range(1500):
        tasks.append(asyncio.create_task(claim(f"crowd_{i:04d}")))
        if i >= 500 and i % 50 == 0:
            tasks.append(asyncio.create_task(claim_unreadable()))
        await asyncio.sleep(max(0.0, started + i / 500 - time.monotonic()))
    await asyncio.gather(*tasks)
    # Some came while the limit was reached: refused before their body was read.
    assert (503, "overloaded") in malformed, malformed
    assert set(malformed) <= {(503, "overloaded"), (400, "invalid_request")}, malformed

    statuses = Counter((status, code) for status, code, _ in answers.values())
    refused = {u for u, (status, *_) in answers.items() if status == 503}
    assert statuses[(503, "overloaded")] == len(refused) > 100, statuses
    assert all(answers[u][2] == "1" for u in refused)  # Retry-After
    # Let in: granted at once or after their wait (202), never refused late.
    let_in = {u for u, (status, *_) in answers.items() if status in (200, 202)}
    assert let_in | refused == set(answers), statuses
    assert statuses[(200, "")] > 0
    # Every claim let in is decided, and only those: a refused claim was never published.
    for _ in range(300):
        if granted_users(settings, slow_coupon) >= let_in:
            break
        await asyncio.sleep(0.1)
    assert granted_users(settings, slow_coupon) == let_in

    # The crowd has gone and the queue drained: claims are let in again.
    await asyncio.sleep(1.5)
    for i in range(10):
        await claim(f"after_{i}")
    assert [answers[f"after_{i}"][0] for i in range(10)] == [200] * 10


async def test_a_full_command_queue_refuses_a_claim_with_503_and_loses_none_accepted(
    services: Services, settings: Settings, http: aiohttp.ClientSession
) -> None:
    """With every consumer away the gateway stays queue-first (202), up to the command
    queue's length limit: past it the broker refuses the publish and the claim is
    answered 503 with a Retry-After. The claims accepted before are all decided once a
    consumer is back."""
    # The consumer applies the policies (a limit of 8 KiB a partition), then goes away.
    first = services.start_consumer(command_queue_max_bytes=8192)
    coupon = f"FULL_{uuid.uuid4().hex[:8]}"
    create_coupon_row(settings.database_url, coupon, 1000)
    await services.start_gateway(claim_wait_seconds=0.2, publish_max_claims=1)
    await asyncio.sleep(3)  # the policies applied
    first.terminate()
    first.wait(30)
    url = f"{services.base_url}/api/coupons/claim"
    answers: list[tuple[str, int, str, str | None]] = []
    for i in range(400):
        user = f"full_{i:03d}"
        async with http.post(url, json={"user_id": user, "coupon_name": coupon}) as r:
            body = await r.json()
            answers.append((user, r.status, body.get("code", ""), r.headers.get("Retry-After")))
        if r.status == 503:
            break
    *accepted, (_, status, code, retry_after) = answers
    assert (status, code, retry_after is not None) == (503, "service_unavailable", True), answers[
        -3:
    ]
    assert accepted and {s for _, s, *_ in accepted} == {202}
    services.start_consumer()
    wanted = {user for user, *_ in accepted}
    for _ in range(300):
        if granted_users(settings, coupon) >= wanted:
            break
        await asyncio.sleep(0.1)
    assert granted_users(settings, coupon) == wanted
