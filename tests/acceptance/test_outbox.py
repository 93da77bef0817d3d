"""Events through real processes: gateway, consumer, relay(s) and the example subscriber.

Each test has a database of its own (``own_settings``): a relay publishes every pending
row of its database. A test queue bound to ``coupon.#`` records every delivery, so
duplicates and order can be seen as they arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from consumer.store import Delivery, apply_batch
from flashclaim.core.db import queries
from flashclaim.core.events import decode
from flashclaim.core.messages import ClaimCommand
from flashclaim.core.settings import Settings
from flashclaim.devtools.devstack import Stack
from tests.acceptance.conftest import LOGS, Services, queue_depth, until_logged
from tests.acceptance.load import Load, verify
from tests.asyncapi import check_message


@pytest.fixture
def outbox_services(own_settings: Settings) -> Any:
    running = Services(own_settings)
    yield running
    running.stop()


@pytest.fixture
async def recorder(own_settings: Settings) -> AsyncIterator[Recorder]:
    recording = Recorder(own_settings)
    await recording.open()
    yield recording
    await recording.close()


class Recorder:
    """A durable queue of the test's own on the events exchange, read in arrival order;
    each message checked against the events' AsyncAPI description (tests/asyncapi.py)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = f"{settings.namespace}.events.recorder"
        self.bodies: list[dict[str, Any]] = []

    async def open(self) -> None:
        connection = await aio_pika.connect(self.settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await self.settings.topology().declare_events(channel)
            queue = await channel.declare_queue(self.name, durable=True)
            await queue.bind(exchange, "coupon.#")

    async def until(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        """Every delivery so far, once there are at least ``count`` (in arrival order)."""
        connection = await aio_pika.connect(self.settings.amqp_url)
        async with connection, asyncio.timeout(timeout):
            channel = await connection.channel()
            queue = await channel.declare_queue(self.name, durable=True, passive=True)
            while len(self.bodies) < count:
                message = await queue.get(fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                assert message.routing_key is not None
                check_message(message.routing_key, message.content_type, message.body)
                bodies = decode(message.content_type, message.body)
                assert message.message_id == bodies[0]["event_id"]
                assert {b["type"] for b in bodies} == {message.routing_key}
                self.bodies.extend(bodies)
                await message.ack()
        return self.bodies

    async def drain(self) -> list[dict[str, Any]]:
        """Every delivery, once the queue is empty. Called when every outbox row is
        SENT (confirmed, so in this queue): nothing can arrive after it."""
        connection = await aio_pika.connect(self.settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(self.name, durable=True, passive=True)
            while (message := await queue.get(fail=False)) is not None:
                assert message.routing_key is not None
                check_message(message.routing_key, message.content_type, message.body)
                self.bodies.extend(decode(message.content_type, message.body))
                await message.ack()
        return self.bodies

    async def close(self) -> None:
        connection = await aio_pika.connect(self.settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(self.name)
            await channel.queue_delete(f"{self.settings.namespace}.events.example")


def relay_log(settings: Settings) -> Path:
    (log,) = LOGS.glob(f"{settings.namespace}-relay-*.log")
    return log


def outbox_rows(settings: Settings) -> list[tuple[str, str, str, str | None]]:
    with psycopg.connect(settings.database_url) as conn:
        return [
            (str(r[0]), r[1], r[2], r[3])
            for r in conn.execute(
                "SELECT id, event_type, status, sent_by FROM outbox ORDER BY seq"
            ).fetchall()
        ]


async def until_all_sent(settings: Settings, timeout: float = 60) -> list[Any]:
    async with asyncio.timeout(timeout):
        while True:
            rows = outbox_rows(settings)
            if rows and all(r[2] == "SENT" for r in rows):
                return rows
            await asyncio.sleep(0.1)


async def until_subscriber_has(settings: Settings, count: int, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                with psycopg.connect(settings.database_url) as conn:
                    row = conn.execute("SELECT count(*) FROM subscriber_inbox").fetchone()
                if row and row[0] >= count:
                    return
            except psycopg.errors.UndefinedTable:
                pass
            await asyncio.sleep(0.1)


def subscriber_view(settings: Settings) -> dict[str, tuple[int, int, bool]]:
    with psycopg.connect(settings.database_url) as conn:
        return {
            r[0]: (r[1], r[2], r[3])
            for r in conn.execute(
                "SELECT coupon_name, amount, claimed, sold_out FROM subscriber_coupons"
            ).fetchall()
        }


def subscriber_seen(settings: Settings) -> int:
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM subscriber_inbox").fetchone()
    return int(row[0]) if row else 0


async def test_a_load_announces_every_change_exactly_once(
    outbox_services: Services,
    own_settings: Settings,
    recorder: Recorder,
    http: aiohttp.ClientSession,
) -> None:
    """After a load of claims with repeated users and sold-out coupons: one
    coupon.created per coupon, one coupon.claimed per granted claim, one coupon.sold_out
    per sold-out coupon, nothing for a refused claim; the subscriber's projection agrees
    with the database, and the audit (which checks the events too) passes."""
    services = outbox_services
    services.start_consumer()
    services.start_relay()
    services.start_subscriber(f"{own_settings.namespace}.events.example")
    await services.start_gateway()
    load = await Load(services, http, claims=1200, coupons=8, stock=40, users=200).start()
    answers = await load.finish()
    await verify(own_settings, load, answers)
    with psycopg.connect(own_settings.database_url) as conn:
        claims = {
            str(r[0]): r[1]
            for r in conn.execute("SELECT message_id, coupon_name FROM claims").fetchall()
        }
        stock: dict[str, int] = dict(
            conn.execute("SELECT name, remaining_amount FROM coupons").fetchall()
        )
    sold_out = {name for name, left in stock.items() if left == 0}
    assert sold_out, "the load should sell some coupons out"
    expected = len(stock) + len(claims) + len(sold_out)
    await recorder.until(expected)
    await until_all_sent(own_settings)
    bodies = await recorder.drain()  # anything extra is in the queue by now
    assert len(bodies) == expected
    assert len({b["event_id"] for b in bodies}) == expected
    by_type = defaultdict(list)
    for body in bodies:
        by_type[body["type"]].append(body)
    assert Counter(b["coupon_name"] for b in by_type["coupon.created"]) == dict.fromkeys(stock, 1)
    assert sorted(b["request_id"] for b in by_type["coupon.claimed"]) == sorted(claims)
    assert all(claims[b["request_id"]] == b["coupon_name"] for b in by_type["coupon.claimed"])
    assert sorted(b["coupon_name"] for b in by_type["coupon.sold_out"]) == sorted(sold_out)
    refused = {a.request_id for a in answers if a.status != 200}
    assert refused and not refused & {b["request_id"] for b in by_type["coupon.claimed"]}
    # Per coupon, in commit order: created first, remaining counting down, sold out last.
    for name in stock:
        mine = [b for b in bodies if b["coupon_name"] == name]
        assert [b["sequence"] for b in mine] == sorted(b["sequence"] for b in mine)
        assert mine[0]["type"] == "coupon.created"
        left = [b["remaining_amount"] for b in mine if b["type"] == "coupon.claimed"]
        amount = load.stocks[name]
        assert left == list(range(amount - 1, amount - 1 - len(left), -1))
        if name in sold_out:
            assert mine[-1]["type"] == "coupon.sold_out"
    await until_subscriber_has(own_settings, expected)
    assert subscriber_view(own_settings) == {
        name: (load.stocks[name], load.stocks[name] - left, left == 0)
        for name, left in stock.items()
    }
    assert {r[2] for r in await until_all_sent(own_settings)} == {"SENT"}


STALL = """
CREATE FUNCTION stall_marks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(60); RETURN NULL; END $$;
CREATE TRIGGER stall_marks BEFORE UPDATE ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION stall_marks();
"""


async def test_a_relay_killed_after_publishing_republishes_and_the_subscriber_applies_once(
    outbox_services: Services, own_settings: Settings, recorder: Recorder
) -> None:
    """The relay's mark-sent is held (a trigger sleeps in it) after the broker confirmed
    the events; the relay is killed -9 there. A new relay publishes the same event ids
    again; the example subscriber has each event once, its projection counted once."""
    services = outbox_services
    with psycopg.connect(own_settings.database_url, autocommit=True) as conn:
        conn.execute(STALL)
    async with AsyncConnectionPool(own_settings.database_url, open=False) as pool:
        await create_and_claim(pool, {"KILLED": 5}, claims=3)
    expected = 1 + 3
    subscriber = services.start_subscriber(f"{own_settings.namespace}.events.example")
    relay = services.start_relay()
    first = await recorder.until(expected)
    with psycopg.connect(own_settings.database_url, autocommit=True) as conn:
        async with asyncio.timeout(10):
            while True:  # polled: nothing to wait on
                if conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
                    " AND application_name LIKE 'flashclaim-relay-%%'"
                ).fetchone():
                    break
                await asyncio.sleep(0.05)
        relay.send_signal(signal.SIGKILL)
        await asyncio.to_thread(relay.wait, 10)
        # Its session sleeps on in the trigger: ended here (its transaction rolls back),
        # rather than waited for.
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE wait_event = 'PgSleep' AND application_name LIKE 'flashclaim-relay-%%'"
        )
        conn.execute("DROP TRIGGER stall_marks ON outbox")
    assert {r[2] for r in outbox_rows(own_settings)} == {"PENDING"}
    services.start_relay()
    again = await recorder.until(2 * expected)
    ids = [b["event_id"] for b in first[:expected]]
    assert sorted(b["event_id"] for b in again[expected:]) == sorted(ids)
    await until_all_sent(own_settings)
    await until_subscriber_has(own_settings, expected)
    # The repeats reached the subscriber too: stopped, it hands back what it had not
    # acknowledged, and its queue is empty.
    subscriber.send_signal(signal.SIGTERM)
    await asyncio.to_thread(subscriber.wait, 10)
    assert await queue_depth(own_settings, f"{own_settings.namespace}.events.example") == 0
    assert subscriber_seen(own_settings) == expected
    assert subscriber_view(own_settings) == {"KILLED": (5, 3, False)}


async def test_events_wait_for_a_broker_that_is_down(
    outbox_services: Services, own_settings: Settings, recorder: Recorder, restore: Stack
) -> None:
    """With RabbitMQ stopped, new events stay PENDING (no attempt counted) and the relay
    keeps running; once the broker is back, they go out."""
    services = outbox_services
    relay = services.start_relay()
    async with AsyncConnectionPool(own_settings.database_url, open=False) as pool:
        await create_and_claim(pool, {"BEFORE": 1}, claims=0)
        await until_all_sent(own_settings)
        assert restore.rabbitmq is not None
        await asyncio.to_thread(restore.rabbitmq.stop)
        try:
            await create_and_claim(pool, {"DURING": 2}, claims=2)
            # The relay did try (it met the broker away, twice, after these rows).
            await until_logged(relay_log(own_settings), "broker away; events wait", 2)
            rows = outbox_rows(own_settings)
            assert [r[2] for r in rows] == ["SENT", "PENDING", "PENDING", "PENDING", "PENDING"]
            with psycopg.connect(own_settings.database_url) as conn:
                assert conn.execute("SELECT max(attempts) FROM outbox").fetchone() == (0,)
            assert relay.poll() is None
        finally:
            await asyncio.to_thread(restore.rabbitmq.start)
    await until_all_sent(own_settings, timeout=90)
    bodies = await recorder.until(5)
    assert [b["coupon_name"] for b in bodies] == ["BEFORE"] + ["DURING"] * 4
    assert [b["type"] for b in bodies[1:]] == [
        "coupon.created",
        "coupon.claimed",
        "coupon.claimed",
        "coupon.sold_out",
    ]


async def test_two_relays_share_the_rows_without_publishing_one_twice(
    outbox_services: Services, own_settings: Settings, recorder: Recorder
) -> None:
    """A backlog of about 2,000 events over 20 coupons, two relays in small batches:
    every event arrives once, each coupon's in commit order, and both relays did work.

    The batches are smaller than the coupons are many (5 of 20, interleaved): a relay
    whose batch held a row of every coupon would hold back the other relay entirely (a
    coupon's rows go out one batch at a time), and one relay would do all the work."""
    services = outbox_services
    coupons = {f"C{i:02d}": 100 for i in range(20)}
    for i in range(2):
        services.start_relay(instance_id=f"relay-{i}", outbox_batch_size=5)
    await until_listening(own_settings, relays=2)
    async with AsyncConnectionPool(own_settings.database_url, open=False) as pool:
        # One transaction: the whole backlog appears at once, for both relays.
        await create_and_claim(pool, coupons, claims=100, one_transaction=True)
    expected = len(outbox_rows(own_settings))
    assert expected == 20 * (1 + 100 + 1)
    await recorder.until(expected)
    rows = await until_all_sent(own_settings)
    bodies = await recorder.drain()
    assert len(bodies) == expected
    assert len({b["event_id"] for b in bodies}) == expected
    for name in coupons:
        sequences = [b["sequence"] for b in bodies if b["coupon_name"] == name]
        assert sequences == sorted(sequences), name
    assert {r[3] for r in rows} == {"relay-0", "relay-1"}


async def until_listening(settings: Settings, relays: int, timeout: float = 30) -> None:
    """Until ``relays`` relays wait for notifications (each LISTENs on a session)."""
    async with asyncio.timeout(timeout):
        while True:
            with psycopg.connect(settings.database_url) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = 'flashclaim-relay-listen' AND datname = %s",
                    (conn.info.dbname,),
                ).fetchone()
            if row and row[0] >= relays:
                return
            await asyncio.sleep(0.1)


async def create_and_claim(
    pool: AsyncConnectionPool, coupons: dict[str, int], claims: int, one_transaction: bool = False
) -> None:
    """Coupons created with their event, then ``claims`` users each claiming every one
    of them, applied by the consumer's own batch code (in batches of 50); all in one
    transaction if ``one_transaction``."""
    todo = [
        Delivery(ClaimCommand(uuid.uuid4(), f"u{i}", name), "test", "x", "claim")
        for i in range(claims)
        for name in coupons
    ]
    async with pool.connection() as conn:
        await conn.set_autocommit(True)
        async with conn.transaction() if one_transaction else contextlib.nullcontext():
            for name, amount in coupons.items():
                await conn.execute(
                    queries()["create_coupon"].encode(),
                    {"name": name, "amount": amount, "traceparent": None},
                )
            for start in range(0, len(todo), 50):
                async with conn.transaction():
                    await apply_batch(conn, todo[start : start + 50], "test")
