"""The inbox's deduplication window (consumer/retention.py): processed commands older than
it are deleted in batches while a sale runs, and no answer of that sale changes; a
dead-lettered command's row stays; after the window, the old claims keep their grants
and a retry is refused as a second claim, never granted twice."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from typing import Any

import aiohttp
import psycopg
import redis.asyncio as aioredis
from psycopg.types.json import Jsonb

from flashclaim.core.results import ResultStore
from flashclaim.core.settings import Settings
from flashclaim.ops import claim_story
from flashclaim.ops.invariants import run_audit
from tests.acceptance.conftest import LOGS, Services
from tests.acceptance.test_contract import call, claim, create

STOCK, USERS, RETRIED = 600, 900, 300
WINDOW_DAYS = 7  # the default window, INBOX_RETENTION_SECONDS


async def sale(
    http: aiohttp.ClientSession, services: Services, coupon: str
) -> dict[str, tuple[int, Any]]:
    """USERS claims with an Idempotency-Key each, the first RETRIED retried at once; every
    answer by user (a retry's must be its first's)."""

    async def one(i: int) -> tuple[str, int, Any]:
        key = {"Idempotency-Key": f"{coupon}-{i}"}
        status, body, _ = await claim(http, services, f"user{i}", coupon, headers=key)
        if i < RETRIED:
            again = await claim(http, services, f"user{i}", coupon, headers=key)
            assert (again[0], again[1]) == (status, body), (i, status, body, again)
        return f"user{i}", status, body

    answers = await asyncio.gather(*(one(i) for i in range(USERS)))
    return {user: (status, body) for user, status, body in answers}


def granted(answers: dict[str, tuple[int, Any]]) -> int:
    codes = sorted({(s, b.get("code", "claimed")) for s, b in answers.values()})
    assert codes == [(200, "claimed"), (400, "out_of_stock")], codes
    return sum(1 for s, _ in answers.values() if s == 200)


def age(settings: Settings, coupon: str, failed_id: uuid.UUID, days: int) -> None:
    """Move a sale, and a dead-lettered command, ``days`` into the past (what the
    window is measured on: the inbox's updated_at, the claims' claimed_at)."""
    shift = dt.timedelta(days=days)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE inbox SET created_at = created_at - %s, updated_at = updated_at - %s"
            " WHERE payload ->> 'coupon_name' = %s OR message_id = %s",
            (shift, shift, coupon, failed_id),
        )
        conn.execute(
            "UPDATE claims SET claimed_at = claimed_at - %s WHERE coupon_name = %s",
            (shift, coupon),
        )


def inbox_rows(settings: Settings, coupon: str) -> int:
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM inbox WHERE payload ->> 'coupon_name' = %s", (coupon,)
        ).fetchone()
    return int(row[0]) if row else -1


async def test_pruning_the_inbox_under_load_changes_no_answer_and_grants_nothing_twice(
    settings: Settings, http: aiohttp.ClientSession
) -> None:
    services = Services(settings)
    consumer = "consumer-retention"
    services.start_consumer(instance_id=consumer, inbox_prune_seconds=0.2, inbox_prune_batch=100)
    await services.start_gateway()
    suffix = uuid.uuid4().hex[:8]
    old, new = f"OLD_{suffix}", f"NEW_{suffix}"
    try:
        # A first sale, answered and recorded; and a command dead-lettered back then.
        await create(http, services, old, STOCK)
        before = await sale(http, services, old)
        assert granted(before) == STOCK
        failed_id = uuid.uuid4()
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO inbox (message_id, sender, event_type, payload, status, error)"
                " VALUES (%s, 'test', 'claim', %s, 'FAILED', 'waits in the DLQ')",
                (failed_id, Jsonb({"user_id": "late", "coupon_name": old})),
            )
        # A command each that reached a consumer (the gateway refuses by itself once it
        # knows the coupon is sold out), and the dead-lettered one.
        recorded = inbox_rows(settings, old)
        assert recorded > STOCK

        # A second sale, while the first one's rows fall out of the window and are pruned.
        await create(http, services, new, STOCK)
        running = asyncio.create_task(sale(http, services, new))
        await asyncio.sleep(0.1)
        age(settings, old, failed_id, WINDOW_DAYS + 1)
        after = await running
        finished = dt.datetime.now(dt.UTC)
        assert granted(after) == STOCK
        for _ in range(100):
            if inbox_rows(settings, old) == 1:
                break
            await asyncio.sleep(0.1)
        # Only the dead-lettered command's row is left of the first sale.
        assert inbox_rows(settings, old) == 1
        with psycopg.connect(settings.database_url) as conn:
            kept = conn.execute("SELECT status FROM inbox WHERE message_id = %s", (failed_id,))
            assert kept.fetchone() == ("FAILED",)
        assert inbox_rows(settings, new) >= STOCK  # inside the window: kept
        log = (LOGS / f"{settings.namespace}-{consumer}.log").read_text().splitlines()
        pruned = [json.loads(x) for x in log if '"inbox pruned"' in x]
        assert sum(p["rows"] for p in pruned) == recorded - 1
        first = dt.datetime.fromisoformat(pruned[0]["time"])
        assert first < finished, "the prune ran after the load, not under it"

        # The audit knows the window: the old claims without their commands are no
        # violation; the new sale's are all accounted for.
        report = run_audit(settings.database_url, pending_older_than=3600, coupons=[old, new])
        assert report.ok, report.render()

        # Past the window, and once Redis has let the answers go too: an old request id
        # is unknown, and a retry of a granted claim is refused as a second claim.
        user, (_, body) = next((u, a) for u, a in before.items() if a[0] == 200)
        request_id = uuid.UUID(body["request_id"])
        story = await claim_story.tell(settings, request_id)
        assert story.verdict.startswith("granted (its command is past"), story.verdict
        redis = aioredis.from_url(settings.redis_url)
        await redis.delete(ResultStore(redis, settings.namespace, 1).result_key(request_id))
        await redis.aclose()
        missing = await call(http, "GET", f"{services.base_url}/api/claims/{request_id}")
        assert (missing[0], missing[1]["code"]) == (404, "claim_not_found")
        index = user.removeprefix("user")
        again = await claim(
            http, services, user, old, headers={"Idempotency-Key": f"{old}-{index}"}
        )
        assert (again[0], again[1]["code"]) == (409, "already_claimed"), again
        with psycopg.connect(settings.database_url) as conn:
            row = conn.execute(
                "SELECT remaining_amount, (SELECT count(*) FROM claims WHERE coupon_name = %s)"
                " FROM coupons WHERE name = %s",
                (old, old),
            ).fetchone()
        assert row == (0, STOCK)
        # The retried command is recorded as refused; the audit and the claim's story
        # tell it from a claim that lost its grant.
        story = await claim_story.tell(settings, request_id)
        assert story.verdict.endswith("retried after it: already_claimed)"), story.verdict
        report = run_audit(settings.database_url, pending_older_than=3600, coupons=[old, new])
        assert report.ok, report.render()
    finally:
        services.stop()
