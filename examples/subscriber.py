"""An example subscriber to flashclaim's events, de-duplicating by ``event_id``.

flashclaim delivers each event at least once: a relay that dies after publishing and
before recording it publishes it again, under the same ``event_id``. This subscriber
keeps its own inbox table: each event is applied in one transaction with the insert of
its id, so an event seen twice is applied once, and it is acknowledged only after that
transaction commits. It reads both envelopes (docs/EVENTS.md): one event a message, and
a run of events as a JSON array (``content_type`` ``BATCH``), whose events it applies
in one transaction, in order. What it applies is a small projection, a coupon's issued and
claimed counts::

    python examples/subscriber.py --amqp-url amqp://guest:guest@127.0.0.1:55672/ \\
        --database-url postgresql://flashclaim@127.0.0.1:55432/flashclaim

Its queue (durable, ``--queue``) is bound to ``<namespace>.events`` with ``coupon.#``,
so events published while it is stopped wait for it. It needs only aio-pika and
psycopg; the tables are created at start if missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal

import aio_pika
import psycopg

log = logging.getLogger("subscriber")
# Envelope 2: the message's body is a JSON array of events (envelope 1: one event).
BATCH = "application/vnd.flashclaim.events.v2+json"

TABLES = """
CREATE TABLE IF NOT EXISTS subscriber_inbox (
    event_id    uuid        PRIMARY KEY,
    type        text        NOT NULL,
    coupon_name text        NOT NULL,
    sequence    bigint      NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS subscriber_coupons (
    coupon_name text    PRIMARY KEY,
    amount      integer NOT NULL DEFAULT 0,
    claimed     integer NOT NULL DEFAULT 0,
    sold_out    boolean NOT NULL DEFAULT false
);
"""

RECORD = """
INSERT INTO subscriber_inbox (event_id, type, coupon_name, sequence)
VALUES (%(event_id)s, %(type)s, %(coupon_name)s, %(sequence)s)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""

APPLY = {
    "coupon.created": """
        INSERT INTO subscriber_coupons (coupon_name, amount) VALUES (%(coupon_name)s, %(amount)s)
        ON CONFLICT (coupon_name) DO UPDATE SET amount = EXCLUDED.amount""",
    "coupon.claimed": """
        INSERT INTO subscriber_coupons (coupon_name, claimed) VALUES (%(coupon_name)s, 1)
        ON CONFLICT (coupon_name)
        DO UPDATE SET claimed = subscriber_coupons.claimed + 1""",
    "coupon.sold_out": """
        INSERT INTO subscriber_coupons (coupon_name, sold_out) VALUES (%(coupon_name)s, true)
        ON CONFLICT (coupon_name) DO UPDATE SET sold_out = true""",
}


def events_of(message: aio_pika.IncomingMessage) -> list[dict[str, object]]:
    """The events a message carries, whichever envelope; ValueError if not events."""
    document = json.loads(message.body)
    events = document if message.content_type == BATCH else [document]
    if not isinstance(events, list) or not events:
        raise ValueError("not an event batch")
    for event in events:
        if not isinstance(event, dict) or event.get("version") != 1:
            raise ValueError("not a version 1 event")
        if event.get("type") not in APPLY:
            raise ValueError("unknown event type")
    return events


async def handle(conn: psycopg.AsyncConnection[object], message: aio_pika.IncomingMessage) -> None:
    try:
        events = events_of(message)
    except ValueError:
        # Not events this subscriber knows: set aside, never retried in a loop.
        log.warning("message refused", extra={"message_id": message.message_id})
        await message.reject(requeue=False)
        return
    async with conn.transaction():
        for event in events:
            cur = await conn.execute(RECORD, event)
            if await cur.fetchone() is not None:  # first time: apply it
                await conn.execute(APPLY[str(event["type"])], event)
    await message.ack()


async def run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    conn = await psycopg.AsyncConnection.connect(args.database_url, autocommit=True)
    await conn.execute(TABLES)
    connection = await aio_pika.connect_robust(args.amqp_url)
    async with connection, conn:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=args.prefetch)
        exchange = await channel.declare_exchange(
            f"{args.namespace}.events", aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            args.queue or f"{args.namespace}.events.example", durable=True
        )
        await queue.bind(exchange, "coupon.#")
        log.warning("subscribed", extra={"queue": queue.name})
        # One message at a time, in delivery order: a coupon's events come in order.
        async with queue.iterator() as messages:
            next_message = asyncio.ensure_future(messages.__anext__())
            stopping = asyncio.ensure_future(stop.wait())
            while True:
                await asyncio.wait({next_message, stopping}, return_when="FIRST_COMPLETED")
                if stop.is_set():
                    next_message.cancel()
                    with contextlib.suppress(BaseException):
                        await next_message
                    return
                await handle(conn, next_message.result())
                next_message = asyncio.ensure_future(messages.__anext__())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:55672/")
    parser.add_argument(
        "--database-url", default="postgresql://flashclaim@127.0.0.1:55432/flashclaim"
    )
    parser.add_argument("--namespace", default="flashclaim")
    parser.add_argument("--queue", help="default: <namespace>.events.example")
    parser.add_argument("--prefetch", type=int, default=200)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
