"""The outbox against real PostgreSQL and RabbitMQ: events written with their change,
published by relay steps in order, refused ones retried and FAILED at the bound, sent
ones pruned."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from consumer.store import Delivery, apply_batch
from flashclaim.core.events import BATCH_CONTENT_TYPE, decode
from flashclaim.core.messages import ClaimCommand
from flashclaim.core.settings import Settings
from gateway.repository import Repository
from relay.relay import EventPublisher, OutboxRelay, RelayPolicy
from tests.acceptance.conftest import service_env

# The connection of each channel the fixture opened.
CONNECTIONS: dict[Any, Any] = {}


def delivery(user: str, coupon: str) -> Delivery:
    return Delivery(ClaimCommand(uuid.uuid4(), user, coupon), "test", "x", "claim")


async def events_of(pool: AsyncConnectionPool, coupon: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT event_type, payload, status FROM outbox WHERE aggregate = %s ORDER BY seq",
            (coupon,),
        )
        return [{"type": t, **p, "status": s} for t, p, s in await cur.fetchall()]


@pytest.fixture
async def own_pool(own_settings: Settings) -> AsyncIterator[AsyncConnectionPool]:
    async with AsyncConnectionPool(
        own_settings.database_url, min_size=1, max_size=4, open=False
    ) as p:
        yield p


async def test_changes_write_their_events_in_their_transaction(
    pool: AsyncConnectionPool, coupon_name: str
) -> None:
    """Creation writes coupon.created; a batch one coupon.claimed per grant (with the
    stock it left) and coupon.sold_out when it takes the stock to 0; refusals, a second
    creation, redeliveries and a rolled-back batch write nothing."""
    repo = Repository(pool)
    await repo.create_coupon(coupon_name, 3)
    with pytest.raises(Exception, match="already exists"):
        await repo.create_coupon(coupon_name, 3)
    first = [delivery(u, coupon_name) for u in ("a", "b", "a")]
    async with pool.connection() as conn, conn.transaction():
        await apply_batch(conn, first, "w")
    # Rolled back: its grants and their events never happened.
    async with pool.connection() as conn:
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await apply_batch(conn, [delivery("x", coupon_name)], "w")
                raise RuntimeError("rolled back")
    second = [delivery(u, coupon_name) for u in ("c", "d", "e")]
    async with pool.connection() as conn, conn.transaction():
        await apply_batch(conn, [*second, first[0]], "w")  # first[0]: a redelivery
    events = await events_of(pool, coupon_name)
    assert [(e["type"], e.get("user_id"), e["remaining_amount"]) for e in events] == [
        ("coupon.created", None, 3),
        ("coupon.claimed", "a", 2),
        ("coupon.claimed", "b", 1),
        ("coupon.claimed", "c", 0),
        ("coupon.sold_out", None, 0),
    ]
    assert events[0]["amount"] == 3 and events[4]["amount"] == 3
    assert events[3]["request_id"] == str(second[0].command.request_id)
    assert {e["status"] for e in events} == {"PENDING"}


@pytest.fixture
async def channel(own_settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect_robust(own_settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        CONNECTIONS[channel] = connection
        yield channel
        await channel.exchange_delete(own_settings.topology().events_exchange)
        del CONNECTIONS[channel]


async def bound_queue(
    channel: aio_pika.abc.AbstractChannel, settings: Settings, key: str = "coupon.#", **args: Any
) -> aio_pika.abc.AbstractQueue:
    exchange = await settings.topology().declare_events(channel)
    queue = await channel.declare_queue(exclusive=True, arguments=args or None)
    await queue.bind(exchange, key)
    return queue


async def drain(queue: aio_pika.abc.AbstractQueue, count: int) -> list[Any]:
    """Messages until they carry ``count`` events (either envelope)."""
    got: list[Any] = []
    async with asyncio.timeout(10):
        while sum(len(decode(m.content_type, m.body)) for m in got) < count:
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            await message.ack()
            got.append(message)
    return got


async def drain_events(queue: aio_pika.abc.AbstractQueue, count: int) -> list[dict[str, Any]]:
    return [e for m in await drain(queue, count) for e in decode(m.content_type, m.body)]


def relay_for(
    settings: Settings,
    pool: AsyncConnectionPool,
    channel: aio_pika.abc.AbstractChannel,
    per_message: int = 100,
    **policy: Any,
) -> OutboxRelay:
    publisher = EventPublisher(CONNECTIONS[channel], settings.topology(), per_message)
    return OutboxRelay(pool, publisher, RelayPolicy("relay-under-test", **policy))


async def test_a_step_publishes_each_event_once_in_order_and_marks_it_sent(
    own_settings: Settings, own_pool: AsyncConnectionPool, channel: Any
) -> None:
    """Envelope 2: a run of one type shares a message (its routing key, AMQP type and
    the first event's id), the events in order, each the version 1 document."""
    queue = await bound_queue(channel, own_settings)
    claimed = await bound_queue(channel, own_settings, "coupon.claimed")
    repo = Repository(own_pool)
    await repo.create_coupon("A", 2)
    async with own_pool.connection() as conn, conn.transaction():
        await apply_batch(conn, [delivery("u1", "A"), delivery("u2", "A")], "w")
    relay = relay_for(own_settings, own_pool, channel)
    step = await relay.step()
    assert (step.taken, step.sent, step.refused) == (4, 4, 0)
    assert (await relay.step()).taken == 0
    messages = await drain(queue, 4)
    assert len(messages) == 3  # created | claimed, claimed | sold_out
    assert {m.content_type for m in messages} == {BATCH_CONTENT_TYPE}
    batches = [decode(m.content_type, m.body) for m in messages]
    assert [[b["type"] for b in batch] for batch in batches] == [
        ["coupon.created"],
        ["coupon.claimed", "coupon.claimed"],
        ["coupon.sold_out"],
    ]
    assert [m.routing_key for m in messages] == [batch[0]["type"] for batch in batches]
    assert [m.type for m in messages] == [batch[0]["type"] for batch in batches]
    assert [m.message_id for m in messages] == [batch[0]["event_id"] for batch in batches]
    assert all(m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT for m in messages)
    bodies = [b for batch in batches for b in batch]
    sequences = [b["sequence"] for b in bodies]
    assert sequences == sorted(sequences)
    for body in bodies:
        assert {"event_id", "type", "version", "occurred_at", "coupon_name", "sequence"} <= set(
            body
        )
        assert body["version"] == 1 and body["coupon_name"] == "A"
    assert {k: bodies[1][k] for k in ("user_id", "remaining_amount")} == {
        "user_id": "u1",
        "remaining_amount": 1,
    }
    # A queue bound to one type gets that type alone.
    assert [b["user_id"] for b in await drain_events(claimed, 2)] == ["u1", "u2"]
    assert await claimed.get(fail=False) is None
    async with own_pool.connection() as conn:
        cur = await conn.execute("SELECT id::text, status, sent_by FROM outbox ORDER BY seq")
        rows = await cur.fetchall()
    assert [r[0] for r in rows] == [b["event_id"] for b in bodies]
    assert {(r[1], r[2]) for r in rows} == {("SENT", "relay-under-test")}


async def test_one_event_a_message_for_subscribers_of_envelope_1(
    own_settings: Settings, own_pool: AsyncConnectionPool, channel: Any
) -> None:
    """OUTBOX_EVENTS_PER_MESSAGE=1: each event alone, the document itself, its id the
    message's."""
    queue = await bound_queue(channel, own_settings)
    await Repository(own_pool).create_coupon("A", 2)
    async with own_pool.connection() as conn, conn.transaction():
        await apply_batch(conn, [delivery("u1", "A"), delivery("u2", "A")], "w")
    relay = relay_for(own_settings, own_pool, channel, per_message=1)
    assert (await relay.step()).sent == 4
    messages = await drain(queue, 4)
    assert len(messages) == 4
    assert {m.content_type for m in messages} == {"application/json"}
    bodies = [json.loads(m.body) for m in messages]
    assert [b["type"] for b in bodies] == [
        "coupon.created",
        "coupon.claimed",
        "coupon.claimed",
        "coupon.sold_out",
    ]
    assert [m.message_id for m in messages] == [b["event_id"] for b in bodies]


async def test_an_earlier_event_held_elsewhere_holds_back_its_coupon_only(
    own_settings: Settings, own_pool: AsyncConnectionPool, channel: Any
) -> None:
    """While another transaction (another relay) holds coupon A's first event, a step
    publishes B's events and none of A's; once it lets go, A's go out in order."""
    queue = await bound_queue(channel, own_settings)
    repo = Repository(own_pool)
    await repo.create_coupon("A", 5)
    await repo.create_coupon("B", 5)
    async with own_pool.connection() as conn, conn.transaction():
        await apply_batch(conn, [delivery(f"u{i}", c) for i in range(3) for c in "AB"], "w")
    relay = relay_for(own_settings, own_pool, channel)
    async with await psycopg.AsyncConnection.connect(own_settings.database_url) as other:
        async with other.transaction():
            await other.execute(
                "SELECT 1 FROM outbox WHERE aggregate = 'A' ORDER BY seq LIMIT 1 FOR UPDATE"
            )
            step = await relay.step()
            assert (step.sent, step.held) == (4, 3)  # B's created + 3 claimed; A's 3 others
            assert {e["coupon_name"] for e in await drain_events(queue, 4)} == {"B"}
        step = await relay.step()
    assert step.sent == 4
    bodies = await drain_events(queue, 4)
    assert [b["coupon_name"] for b in bodies] == ["A"] * 4
    assert [b["type"] for b in bodies] == ["coupon.created"] + ["coupon.claimed"] * 3
    assert [b["sequence"] for b in bodies] == sorted(b["sequence"] for b in bodies)


def outbox_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flashclaim.cli", "outbox", *args],
        env=service_env(settings),
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_refused_events_are_retried_then_failed_and_an_operator_retries_them(
    own_settings: Settings, own_pool: AsyncConnectionPool, channel: Any
) -> None:
    """A queue that refuses every publish (full, overflow reject-publish) makes the
    broker nack: each refusal is an attempt with a backoff, FAILED at the bound with the
    error; `flashclaim outbox stats` shows it and `retry` sends it once the queue
    takes messages again."""
    full = await bound_queue(
        channel,
        own_settings,
        "coupon.created",
        **{"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    await Repository(own_pool).create_coupon("A", 1)
    relay = relay_for(own_settings, own_pool, channel, max_attempts=2, retry_seconds=0.2)
    step = await relay.step()
    assert (step.sent, step.refused, step.failed) == (0, 1, 0)
    assert relay.publisher.renewals == 1  # the next batch goes out on a new channel
    assert (await relay.step()).taken == 0  # backing off
    await asyncio.sleep(0.3)
    step = await relay.step()
    assert (step.refused, step.failed) == (1, 1)
    stats = json.loads(outbox_cli(own_settings, "stats", "--json").stdout)
    assert (stats["pending"], stats["failed"]) == (0, 1)
    assert stats["failed_rows"][0]["attempts"] == 2
    assert "nack" in stats["failed_rows"][0]["last_error"]
    assert (await relay.step()).taken == 0  # FAILED rows are left alone
    await full.delete(if_unused=False, if_empty=False)
    queue = await bound_queue(channel, own_settings)
    refused = outbox_cli(own_settings, "retry")
    assert refused.returncode == 2 and "--all" in refused.stderr
    retried = outbox_cli(own_settings, "retry", "--all")
    assert retried.returncode == 0, retried.stderr
    assert "1 FAILED event(s) pending again" in retried.stdout
    assert (await relay.step()).sent == 1
    assert (await drain_events(queue, 1))[0]["type"] == "coupon.created"
    assert outbox_cli(own_settings, "retry", "--all").returncode == 1  # nothing left
    assert relay.publisher.renewals == 2  # one a refused batch
    await relay.publisher.close()


async def test_sent_events_are_pruned_after_the_retention_period(
    own_settings: Settings, own_pool: AsyncConnectionPool, channel: Any
) -> None:
    await bound_queue(channel, own_settings)
    repo = Repository(own_pool)
    await repo.create_coupon("OLD", 1)
    relay = relay_for(own_settings, own_pool, channel)
    assert (await relay.step()).sent == 1
    await repo.create_coupon("NEW", 1)  # pending: never pruned
    await asyncio.sleep(0.5)
    assert await relay.prune(retention_seconds=0.4) == 1
    async with own_pool.connection() as conn:
        cur = await conn.execute("SELECT aggregate, status FROM outbox")
        assert await cur.fetchall() == [("NEW", "PENDING")]
