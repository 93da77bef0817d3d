"""The consumer against real RabbitMQ, PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import orjson
import psycopg
import pytest
import redis.asyncio as aioredis

from consumer import service
from flashclaim.core.messages import (
    ClaimCommand,
    ClaimResult,
    Outcome,
    decode_claims,
    encode_claims,
)
from flashclaim.core.results import ResultStore
from flashclaim.core.settings import Settings
from flashclaim.ops.deadletters import DeadLetterQueue, Selection
from tests.conftest import create_coupon_row

REPLIES = "replies-under-test"


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(settings.amqp_url)
    channel = await connection.channel()
    await settings.topology().declare(channel)
    yield channel
    topo = settings.topology()
    for queue in (*topo.claims_queues, topo.claims_dlq):
        await channel.queue_delete(queue)
    await connection.close()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(settings.redis_url)
    yield client
    await client.aclose()


Runner = Callable[[], Awaitable[None]]


@pytest.fixture
async def consumers(settings: Settings) -> AsyncIterator[Callable[[int], None]]:
    """Start n consumer services in this event loop; all are stopped at teardown."""
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    def start(n: int) -> None:
        for i in range(n):
            s = settings.replace(instance_id=f"{settings.instance_id}-{len(tasks)}-{i}")
            tasks.append(asyncio.create_task(service.run(s, stop)))

    yield start
    stop.set()
    await asyncio.gather(*tasks)


async def publish(
    channel: aio_pika.abc.AbstractChannel,
    settings: Settings,
    command: ClaimCommand,
    body: bytes | None = None,
) -> None:
    await publish_many(channel, settings, [command], body)


async def collect_replies(
    pubsub: aioredis.client.PubSub, count: int, timeout: float = 20.0
) -> list[ClaimResult]:
    replies: list[ClaimResult] = []
    async with asyncio.timeout(timeout):
        while len(replies) < count:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                replies.extend(ClaimResult.loads_many(message["data"]))
    return replies


async def next_dead_letter(
    channel: aio_pika.abc.AbstractChannel, settings: Settings, timeout: float = 10.0
) -> aio_pika.abc.AbstractIncomingMessage:
    """The next message in the DLQ (not acknowledged yet), waiting up to ``timeout``."""
    dlq = await channel.declare_queue(settings.topology().claims_dlq, passive=True)
    async with asyncio.timeout(timeout):
        while True:  # basic.get polls: there is nothing to wait on
            dead = await dlq.get(fail=False)
            if dead is not None:
                return dead
            await asyncio.sleep(0.1)


async def until_tried(settings: Settings, sequence: str, times: int, timeout: float = 30) -> None:
    """Until a trigger's counter (a sequence: not rolled back with the failed
    transaction) shows it ran ``times`` times."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        async with asyncio.timeout(timeout):
            while True:
                row = conn.execute(f"SELECT last_value, is_called FROM {sequence}").fetchone()
                if row and row[1] and row[0] >= times:
                    return
                await asyncio.sleep(0.05)


async def until_consuming(settings: Settings, timeout: float = 30) -> None:
    """Until every command queue has its consumer (the topology is declared by then).
    A passive declaration of a queue not there yet closes its channel: one per try."""
    async with await aio_pika.connect(settings.amqp_url) as connection, asyncio.timeout(timeout):
        for name in settings.topology().claims_queues:
            while True:
                channel = await connection.channel()
                try:
                    queue = await channel.declare_queue(name, passive=True)
                    if queue.declaration_result.consumer_count:
                        break
                except aio_pika.exceptions.ChannelNotFoundEntity:
                    pass
                finally:
                    if not channel.is_closed:
                        await channel.close()
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def subscribed(redis: aioredis.Redis) -> AsyncIterator[aioredis.client.PubSub]:
    pubsub = redis.pubsub()
    await pubsub.subscribe(REPLIES)
    try:
        yield pubsub
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_same_message_delivered_many_times_has_one_effect_and_identical_answers(
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    redis: aioredis.Redis,
    consumers: Callable[[int], None],
    coupon_name: str,
) -> None:
    create_coupon_row(settings.database_url, coupon_name, 10)
    command = ClaimCommand(uuid.uuid4(), "alice", coupon_name, REPLIES)
    async with subscribed(redis) as pubsub:
        # Copies arrive in one batch and in several; a second consumer stands by (one
        # active consumer per partition). Two transactions holding the same message at
        # once are tested in tests/integration/test_store.py.
        consumers(2)
        await asyncio.gather(*(publish(broker, settings, command) for _ in range(8)))
        replies = await collect_replies(pubsub, 8)
    assert {r.outcome for r in replies} == {Outcome.CLAIMED}
    assert len({r.dumps() for r in replies}) == 1
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute(
            "SELECT remaining_amount FROM coupons WHERE name = %s", (coupon_name,)
        ).fetchone() == (9,)
        assert conn.execute(
            "SELECT count(*) FROM claims WHERE coupon_name = %s", (coupon_name,)
        ).fetchone() == (1,)
    stored = await ResultStore(redis, settings.namespace, 60).get(command.request_id)
    assert stored == replies[0]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", "not JSON"),
        (b'{"v": 3, "user_id": "u", "coupon_name": "c"}', "unknown message version"),
        (b'{"v": 2, "claims": []}', "'claims' is not a non-empty list"),
        (b'{"v": 1, "user_id": "", "coupon_name": "c"}', "user_id"),
        (b'{"v": 1, "user_id": "u", "coupon_name": "' + "é".encode() * 128 + b'"}', "bytes"),
    ],
)
async def test_poison_message_is_dead_lettered_and_does_not_block_the_others(
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    redis: aioredis.Redis,
    consumers: Callable[[int], None],
    coupon_name: str,
    body: bytes,
    error: str,
) -> None:
    create_coupon_row(settings.database_url, coupon_name, 3)
    poison = ClaimCommand(uuid.uuid4(), "mallory", coupon_name, REPLIES)
    good = [ClaimCommand(uuid.uuid4(), f"user{i}", coupon_name, REPLIES) for i in range(3)]
    await publish(broker, settings, poison, body=body)
    for command in good:
        await publish(broker, settings, command)
    async with subscribed(redis) as pubsub:
        consumers(1)
        replies = await collect_replies(pubsub, 3)
    assert [r.outcome for r in replies] == [Outcome.CLAIMED] * 3

    dlq = await broker.declare_queue(settings.topology().claims_dlq, passive=True)
    dead = await dlq.get(timeout=10, fail=True)
    assert dead is not None
    assert dead.message_id == str(poison.request_id)
    assert dead.body == body
    headers = dead.headers
    assert headers["x-flashclaim-reason"] == "poison"
    assert headers["x-flashclaim-error-type"] == "PoisonMessage"
    assert error in str(headers["x-flashclaim-error"])
    assert str(headers["x-flashclaim-service"]).startswith("consumer ")
    assert headers["x-flashclaim-original-routing-key"] == coupon_name
    assert headers["x-flashclaim-failed-at"]
    await dead.ack()
    assert await dlq.get(fail=False) is None  # exactly one copy


async def test_unknown_coupon_is_answered_404_not_dead_lettered(
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    redis: aioredis.Redis,
    consumers: Callable[[int], None],
) -> None:
    command = ClaimCommand(uuid.uuid4(), "alice", f"NOPE_{uuid.uuid4().hex}", REPLIES)
    async with subscribed(redis) as pubsub:
        consumers(1)
        await publish(broker, settings, command)
        (reply,) = await collect_replies(pubsub, 1)
    assert reply.outcome is Outcome.NO_SUCH_COUPON
    dlq = await broker.declare_queue(settings.topology().claims_dlq, passive=True)
    assert await dlq.get(fail=False) is None


async def test_failing_command_is_retried_by_the_broker_then_failed_and_dead_lettered(
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    redis: aioredis.Redis,
    consumers: Callable[[int], None],
    coupon_name: str,
    exploding_user: str,
) -> None:
    create_coupon_row(settings.database_url, coupon_name, 10)
    bad = ClaimCommand(uuid.uuid4(), exploding_user, coupon_name, REPLIES)
    good = [ClaimCommand(uuid.uuid4(), f"user{i}", coupon_name, REPLIES) for i in range(4)]
    # The bad command lands in the same batch as good ones: they must not suffer.
    for command in [good[0], bad, *good[1:]]:
        await publish(broker, settings, command)
    async with subscribed(redis) as pubsub:
        consumers(1)
        replies = await collect_replies(pubsub, 4)
    assert [r.outcome for r in replies] == [Outcome.CLAIMED] * 4

    dead = await next_dead_letter(broker, settings)
    assert dead.message_id == str(bad.request_id)
    assert dead.headers["x-flashclaim-reason"] == "failed"
    assert dead.headers["x-flashclaim-attempts"] == settings.max_attempts
    assert "refusing claims" in str(dead.headers["x-flashclaim-error"])
    await dead.ack()
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(
            "SELECT status, retry_count, error FROM inbox WHERE message_id = %s", (bad.request_id,)
        ).fetchone()
        assert row is not None
        assert (row[0], row[1]) == ("FAILED", settings.max_attempts)
        assert "refusing claims" in row[2]
        assert conn.execute(
            "SELECT count(*) FROM claims WHERE user_id = %s", (exploding_user,)
        ).fetchone() == (0,)


@pytest.mark.parametrize(
    "sqlstate",
    [
        "25006",  # read-only transaction: a failover left the consumer on a standby
        "57014",  # statement timeout
        "53100",  # disk full
        "53300",  # too many connections
        "57P01",  # admin shutdown
    ],
)
async def test_database_errors_that_are_outages_hold_messages_without_spending_attempts(
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    redis: aioredis.Redis,
    consumers: Callable[[int], None],
    coupon_name: str,
    sqlstate: str,
) -> None:
    """The database refuses all work with an outage's SQLSTATE for a few seconds (a
    trigger raises it): the claim waits, counts no failed attempt, is not dead-lettered,
    and is applied once the database works again."""
    create_coupon_row(settings.database_url, coupon_name, 10)
    trigger = f"outage_{coupon_name.lower()}"
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(f"""
            CREATE SEQUENCE {trigger}_tries;
            CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM nextval('{trigger}_tries');  -- counted, whatever rolls back
                RAISE EXCEPTION 'simulated outage' USING ERRCODE = '{sqlstate}';
            END $$;
            CREATE TRIGGER {trigger} BEFORE INSERT ON claims FOR EACH ROW
            WHEN (NEW.coupon_name = '{coupon_name}') EXECUTE FUNCTION {trigger}();
        """)
    command = ClaimCommand(uuid.uuid4(), "user_1", coupon_name, REPLIES)
    try:
        async with subscribed(redis) as pubsub:
            await publish(broker, settings, command)
            consumers(1)
            # Positive evidence that the consumer kept trying: the trigger ran more
            # times than MAX_ATTEMPTS would allow if each try were a failed attempt.
            await until_tried(settings, f"{trigger}_tries", settings.max_attempts + 2)
            dlq = await broker.declare_queue(settings.topology().claims_dlq, passive=True)
            assert dlq.declaration_result.message_count == 0
            with psycopg.connect(settings.database_url) as conn:
                row = conn.execute(
                    "SELECT status, retry_count FROM inbox WHERE message_id = %s",
                    (command.request_id,),
                ).fetchone()
            assert row is None or row == ("PENDING", 0), row
        async with subscribed(redis) as pubsub:
            with psycopg.connect(settings.database_url, autocommit=True) as conn:
                conn.execute(f"DROP TRIGGER {trigger} ON claims; DROP FUNCTION {trigger}();")
            (reply,) = await collect_replies(pubsub, 1)
        assert (reply.request_id, reply.outcome) == (command.request_id, Outcome.CLAIMED)
    finally:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(
                f"DROP TRIGGER IF EXISTS {trigger} ON claims; DROP FUNCTION IF EXISTS {trigger}();"
                f" DROP SEQUENCE IF EXISTS {trigger}_tries;"
            )


async def test_dead_letter_is_kept_when_the_dlq_was_deleted(
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    consumers: Callable[[int], None],
    coupon_name: str,
) -> None:
    """A dead letter that no queue takes is not counted as sent: the consumer declares
    the DLQ again and moves the message there."""
    consumers(1)
    await until_consuming(settings)  # its topology declared, it is subscribed
    await broker.queue_delete(settings.topology().claims_dlq)
    poison = ClaimCommand(uuid.uuid4(), "u", coupon_name, REPLIES)
    await publish(broker, settings, poison, body=b"{not json")
    dead = None
    for _ in range(100):
        await asyncio.sleep(0.1)
        try:
            async with await aio_pika.connect(settings.amqp_url) as connection:
                channel = await connection.channel()
                dlq = await channel.declare_queue(settings.topology().claims_dlq, passive=True)
                dead = await dlq.get(fail=False)
                if dead is not None:
                    await dead.ack()
                    break
        except aio_pika.exceptions.ChannelNotFoundEntity:
            continue
    assert dead is not None, "the dead letter was lost"
    assert (dead.message_id, dead.headers["x-flashclaim-reason"]) == (
        str(poison.request_id),
        "poison",
    )


async def test_attempts_are_counted_in_the_inbox_not_by_the_broker(
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    consumers: Callable[[int], None],
    coupon_name: str,
    exploding_user: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The inbox already holds two failed attempts of this command (say, from before a
    broker restart, or on a broker that does not count requeues): one more failure is
    the last, at the broker's first delivery."""
    create_coupon_row(settings.database_url, coupon_name, 10)
    bad = ClaimCommand(uuid.uuid4(), exploding_user, coupon_name, REPLIES)
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(
            "INSERT INTO inbox (message_id, sender, event_type, payload, retry_count)"
            " VALUES (%s, 'test', 'coupon.claim.requested', %s, 2)",
            (
                bad.request_id,
                orjson.dumps({"user_id": bad.user_id, "coupon_name": coupon_name}).decode(),
            ),
        )
    await publish(broker, settings, bad)
    consumers(1)
    dead = await next_dead_letter(broker, settings)
    assert dead.headers["x-flashclaim-attempts"] == settings.max_attempts == 3
    # Failed for good at its first delivery: never handed back to the broker to retry.
    assert not [r for r in caplog.records if r.getMessage() == "command failed; requeued"]
    await dead.ack()
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute(
            "SELECT status, retry_count FROM inbox WHERE message_id = %s", (bad.request_id,)
        ).fetchone() == ("FAILED", 3)


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])  # serialization failure, deadlock
async def test_a_lost_race_runs_the_batch_again_without_spending_an_attempt(
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    redis: aioredis.Redis,
    consumers: Callable[[int], None],
    coupon_name: str,
    sqlstate: str,
) -> None:
    """The batch transaction loses a race three times in a row (a trigger raises the
    SQLSTATE, counting in a sequence, which rollbacks do not undo): it runs again at
    once, and the claim is applied with no failed attempt recorded."""
    create_coupon_row(settings.database_url, coupon_name, 10)
    trigger = f"race_{coupon_name.lower()}"
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(f"""
            CREATE SEQUENCE {trigger};
            CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('{trigger}') <= 3 THEN
                    RAISE EXCEPTION 'simulated lost race' USING ERRCODE = '{sqlstate}';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER {trigger} BEFORE INSERT ON claims FOR EACH ROW
            WHEN (NEW.coupon_name = '{coupon_name}') EXECUTE FUNCTION {trigger}();
        """)
    command = ClaimCommand(uuid.uuid4(), "user_1", coupon_name, REPLIES)
    try:
        async with subscribed(redis) as pubsub:
            await publish(broker, settings, command)
            consumers(1)
            (reply,) = await collect_replies(pubsub, 1)
        assert (reply.request_id, reply.outcome) == (command.request_id, Outcome.CLAIMED)
        with psycopg.connect(settings.database_url) as conn:
            assert conn.execute(
                "SELECT status, retry_count FROM inbox WHERE message_id = %s",
                (command.request_id,),
            ).fetchone() == ("PROCESSED", 0)
            # The races were lost (three raised, the fourth insert went through).
            assert conn.execute(f"SELECT last_value FROM {trigger}").fetchone() == (4,)
    finally:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(
                f"DROP TRIGGER IF EXISTS {trigger} ON claims; DROP FUNCTION IF EXISTS {trigger}();"
                f"DROP SEQUENCE IF EXISTS {trigger};"
            )


async def publish_many(
    channel: aio_pika.abc.AbstractChannel,
    settings: Settings,
    commands: list[ClaimCommand],
    body: bytes | None = None,
) -> str:
    """One message carrying ``commands`` as a gateway sends them (one claim: version 1,
    with its request id as message id); its message id."""
    message_id, encoded = encode_claims(commands)
    exchange = await channel.get_exchange(settings.topology().commands_exchange)
    await exchange.publish(
        aio_pika.Message(
            body if body is not None else encoded,
            message_id=message_id,
            reply_to=commands[0].reply_to,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        commands[0].coupon_name,
    )
    return message_id


async def test_a_poison_claim_inside_a_message_is_dead_lettered_alone(
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    redis: aioredis.Redis,
    consumers: Callable[[int], None],
    coupon_name: str,
) -> None:
    create_coupon_row(settings.database_url, coupon_name, 10)
    good = [ClaimCommand(uuid.uuid4(), f"user{i}", coupon_name, REPLIES) for i in range(3)]
    poison_id = str(uuid.uuid4())
    claims = [
        {"request_id": str(c.request_id), "user_id": c.user_id, "coupon_name": coupon_name}
        for c in good
    ]
    claims.insert(1, {"request_id": poison_id, "user_id": "", "coupon_name": coupon_name})
    async with subscribed(redis) as pubsub:
        await publish_many(broker, settings, good, orjson.dumps({"v": 2, "claims": claims}))
        consumers(1)
        replies = await collect_replies(pubsub, 3)
    assert {(r.request_id, r.outcome) for r in replies} == {
        (c.request_id, Outcome.CLAIMED) for c in good
    }
    dead = await next_dead_letter(broker, settings)
    assert dead.message_id == poison_id
    assert orjson.loads(dead.body) == {"v": 1, "user_id": "", "coupon_name": coupon_name}
    assert dead.headers["x-flashclaim-reason"] == "poison"
    assert "user_id" in str(dead.headers["x-flashclaim-error"])
    await dead.ack()
    dlq = await broker.declare_queue(settings.topology().claims_dlq, passive=True)
    assert await dlq.get(fail=False) is None  # the good claims are not in the DLQ
    commands_left = 0
    for name in settings.topology().claims_queues:
        queue = await broker.declare_queue(name, passive=True)
        commands_left += queue.declaration_result.message_count or 0
    assert commands_left == 0  # the carrying message was acknowledged


async def test_a_failing_claim_inside_a_message_fails_alone_and_its_replay_applies_once(
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    redis: aioredis.Redis,
    consumers: Callable[[int], None],
    coupon_name: str,
    exploding_user: str,
) -> None:
    """The others apply at the first delivery; the message comes back for the failing
    claim until its attempts are spent (the applied ones answered from the inbox, not
    applied again); then that claim alone is dead-lettered, as a message of its own, and
    once the database accepts it a replay applies it exactly once."""
    create_coupon_row(settings.database_url, coupon_name, 10)
    good = [ClaimCommand(uuid.uuid4(), f"user{i}", coupon_name, REPLIES) for i in range(4)]
    bad = ClaimCommand(uuid.uuid4(), exploding_user, coupon_name, REPLIES)
    async with subscribed(redis) as pubsub:
        await publish_many(broker, settings, [good[0], bad, *good[1:]])
        consumers(1)
        replies = await collect_replies(pubsub, 4)
        assert [r.outcome for r in replies] == [Outcome.CLAIMED] * 4
        dead = await next_dead_letter(broker, settings)
    assert dead.message_id == str(bad.request_id)
    (decoded,) = decode_claims(dead.message_id, dead.body, None).commands
    assert decoded.user_id == exploding_user
    assert dead.headers["x-flashclaim-reason"] == "failed"
    assert dead.headers["x-flashclaim-attempts"] == settings.max_attempts
    await dead.nack(requeue=True)  # left for the replay
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute(
            "SELECT status, retry_count FROM inbox WHERE message_id = %s", (bad.request_id,)
        ).fetchone() == ("FAILED", settings.max_attempts)
        assert conn.execute(
            "SELECT count(*), min(remaining_amount) FROM claims JOIN coupons c"
            " ON c.name = coupon_name WHERE coupon_name = %s",
            (coupon_name,),
        ).fetchone() == (4, 6)
    # The cause is fixed (the database accepts this user again), then the replay.
    trigger = f"explode_{exploding_user.replace('-', '_')}"
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(f"DROP TRIGGER {trigger} ON claims")
    connection = await aio_pika.connect_robust(settings.amqp_url)
    try:
        async with subscribed(redis) as pubsub:
            replayed = await DeadLetterQueue(connection, settings.topology()).replay(
                Selection.of(message_ids=[str(bad.request_id)])
            )
            assert [letter.message_id for letter in replayed] == [str(bad.request_id)]
            (reply,) = await collect_replies(pubsub, 1)
            # A second replay of the same claim (an operator's mistake) changes nothing:
            # it is answered again, from the inbox, with the same answer.
            await publish(broker, settings, bad)
            (again,) = await collect_replies(pubsub, 1)
    finally:
        await connection.close()
    assert (reply.request_id, reply.outcome) == (bad.request_id, Outcome.CLAIMED)
    assert again == reply
    with psycopg.connect(settings.database_url) as conn:
        for _ in range(50):
            status = conn.execute(
                "SELECT status FROM inbox WHERE message_id = %s", (bad.request_id,)
            ).fetchone()
            if status == ("PROCESSED",):
                break
            await asyncio.sleep(0.1)
        assert conn.execute(
            "SELECT count(*) FROM claims WHERE coupon_name = %s AND user_id = %s",
            (coupon_name, exploding_user),
        ).fetchone() == (1,)
        assert conn.execute(
            "SELECT remaining_amount FROM coupons WHERE name = %s", (coupon_name,)
        ).fetchone() == (5,)
