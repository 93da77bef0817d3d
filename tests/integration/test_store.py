"""apply_batch against a real PostgreSQL: effects, recorded results, concurrent duplicates."""

from __future__ import annotations

import asyncio
import uuid

from psycopg_pool import AsyncConnectionPool

from consumer.store import Delivery, apply_batch
from flashclaim.core.messages import ClaimCommand
from flashclaim.core.settings import Settings
from tests.conftest import create_coupon_row


def delivery(user: str, coupon: str, request_id: uuid.UUID | None = None) -> Delivery:
    return Delivery(ClaimCommand(request_id or uuid.uuid4(), user, coupon), "test", "x", "claim")


async def apply(pool: AsyncConnectionPool, deliveries: list[Delivery]):  # type: ignore[no-untyped-def]
    async with pool.connection() as conn, conn.transaction():
        return await apply_batch(conn, deliveries, "test-worker")


async def coupon_state(pool: AsyncConnectionPool, name: str) -> tuple[int, list[str]]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT remaining_amount FROM coupons WHERE name = %s", (name,))
        (remaining,) = await cur.fetchone()  # type: ignore[misc]
        cur = await conn.execute(
            "SELECT user_id FROM claims WHERE coupon_name = %s ORDER BY id", (name,)
        )
        return remaining, [r[0] for r in await cur.fetchall()]


async def test_batch_grants_in_order_and_records_every_result(
    settings: Settings, pool: AsyncConnectionPool, coupon_name: str
) -> None:
    create_coupon_row(settings.database_url, coupon_name, 2)
    batch = [delivery(f"u{i}", coupon_name) for i in range(4)] + [delivery("u0", coupon_name)]
    outcome = await apply(pool, batch)
    statuses = [outcome.results[d.command.request_id].status for d in batch]
    assert statuses == [200, 200, 400, 400, 409]
    assert await coupon_state(pool, coupon_name) == (0, ["u0", "u1"])
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM inbox WHERE message_id = ANY(%s) AND status = 'PROCESSED'",
            ([d.command.request_id for d in batch],),
        )
        assert (await cur.fetchone()) == (5,)


async def test_redelivery_returns_the_recorded_result_without_a_second_effect(
    settings: Settings, pool: AsyncConnectionPool, coupon_name: str
) -> None:
    create_coupon_row(settings.database_url, coupon_name, 5)
    first = delivery("alice", coupon_name)
    original = await apply(pool, [first])
    again = await apply(pool, [first, first])
    assert again.applied == 0
    assert again.results[first.command.request_id] == original.results[first.command.request_id]
    assert await coupon_state(pool, coupon_name) == (4, ["alice"])


async def test_concurrent_transactions_with_the_same_messages_have_one_effect(
    settings: Settings, pool: AsyncConnectionPool, coupon_name: str
) -> None:
    create_coupon_row(settings.database_url, coupon_name, 100)
    batch = [delivery(f"user{i}", coupon_name) for i in range(20)]
    outcomes = await asyncio.gather(
        *(apply(pool, list(reversed(batch)) if i % 2 else batch) for i in range(4))
    )
    assert sum(o.applied for o in outcomes) == 20
    for d in batch:
        answers = {
            (
                o.results[d.command.request_id].status,
                o.results[d.command.request_id].body["request_id"],
            )
            for o in outcomes
        }
        assert answers == {(200, str(d.command.request_id))}
    remaining, holders = await coupon_state(pool, coupon_name)
    assert remaining == 80
    assert sorted(holders) == sorted(f"user{i}" for i in range(20))


async def test_unknown_coupon_is_recorded_as_404(pool: AsyncConnectionPool) -> None:
    d = delivery("alice", f"MISSING_{uuid.uuid4().hex}")
    outcome = await apply(pool, [d])
    result = outcome.results[d.command.request_id]
    assert (result.status, result.body["code"]) == (404, "coupon_not_found")


async def test_service_connections_plan_each_statement_for_the_tables_as_they_are(
    settings: Settings,
) -> None:
    """A generic plan made while the tables are small would go on scanning them as they
    grow (flashclaim/core/db.py configure_session)."""
    from flashclaim.core.db import create_pool

    pool = create_pool(settings.database_url, 1, 1, "test-plan-cache")
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            cur = await conn.execute("SHOW plan_cache_mode")
            assert await cur.fetchone() == ("force_custom_plan",)
    finally:
        await pool.close()
