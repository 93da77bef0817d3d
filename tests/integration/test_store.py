"""apply_batch against a real PostgreSQL: effects, recorded results, concurrent duplicates."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from consumer.store import Delivery, apply_batch
from flashclaim.core.messages import ClaimCommand, Outcome
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
    codes = [outcome.results[d.command.request_id].outcome.code for d in batch]
    assert codes == ["claimed", "claimed", "out_of_stock", "out_of_stock", "already_claimed"]
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
                o.results[d.command.request_id].outcome,
                o.results[d.command.request_id].request_id,
            )
            for o in outcomes
        }
        assert answers == {(Outcome.CLAIMED, d.command.request_id)}
    remaining, holders = await coupon_state(pool, coupon_name)
    assert remaining == 80
    assert sorted(holders) == sorted(f"user{i}" for i in range(20))


async def test_unknown_coupon_is_recorded_as_not_found(pool: AsyncConnectionPool) -> None:
    d = delivery("alice", f"MISSING_{uuid.uuid4().hex}")
    outcome = await apply(pool, [d])
    result = outcome.results[d.command.request_id]
    assert result.outcome is Outcome.NO_SUCH_COUPON


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


async def test_two_consumers_over_coupons_in_opposite_orders_neither_deadlock_nor_oversell(
    settings: Settings, pool: AsyncConnectionPool
) -> None:
    """Two batches over the same coupons, one in the opposite order of the other, both
    stopped by a lock a third session holds on the middle coupon, then let go at once:
    each locks its coupons in name order, so neither holds one the other is waiting for
    (locked in arrival order, the first would hold the lower half and the second the
    upper: a deadlock, which PostgreSQL would break by failing one). Both commit, and
    stock and holders add up."""
    coupons = [f"ORDER_{uuid.uuid4().hex[:8]}_{i:02d}" for i in range(9)]
    for name in coupons:
        create_coupon_row(settings.database_url, name, 30)
    users = ["a", "b", "shared"]
    forward = [delivery(u, c) for c in coupons for u in users]
    backward = [delivery(u, c) for c in reversed(coupons) for u in reversed(users)]
    url = settings.database_url
    async with (
        await psycopg.AsyncConnection.connect(url) as holder,
        await psycopg.AsyncConnection.connect(url, autocommit=True) as watcher,
    ):
        await holder.execute("SELECT 1 FROM coupons WHERE name = %s FOR UPDATE", (coupons[4],))
        batches = [asyncio.create_task(apply(pool, b)) for b in (forward, backward)]
        async with asyncio.timeout(10):
            while await waiting_for_locks(watcher) < 2:  # noqa: ASYNC110 - polled
                await asyncio.sleep(0.02)
        await holder.commit()
    first, second = await asyncio.gather(*batches)
    assert first.granted + second.granted == len(coupons) * len(users)
    for name in coupons:
        remaining, holders = await coupon_state(pool, name)
        assert sorted(holders) == sorted(users) and remaining == 30 - len(users)


async def waiting_for_locks(conn: psycopg.AsyncConnection[Any]) -> int:
    """Sessions waiting for a lock now (asked outside a transaction: within one,
    pg_stat_activity is read once)."""
    cur = await conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND datname = current_database()"
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0
