"""One consumer draining one hot coupon: claims queued first, then applied as fast as it can.

The claims are published straight to the command exchange as gateways send them under
load (messages of ``per_message`` coalesced claims), while no consumer runs; then one
consumer starts. Its rate is read from the database itself: claims over the time between
the first and the last batch's transaction (so start-up does not count).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import psycopg

from flashclaim.core import broker
from flashclaim.core.messages import CLAIM_EVENT, ClaimCommand, encode_claims
from flashclaim.core.settings import Settings


async def queue_claims(settings: Settings, coupon: str, claims: int, per_message: int) -> None:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO coupons (name, amount, remaining_amount) VALUES (%s, %s, %s)",
            (coupon, claims, claims),
        )
    connection = await broker.connect(settings.amqp_url, "bench drain")
    try:
        channel = await connection.channel(publisher_confirms=True)
        declared = await settings.topology().declare(channel)
        pending: list[asyncio.Future[object]] = []
        for start in range(0, claims, per_message):
            commands = [
                ClaimCommand(uuid.uuid4(), f"drain_{i}", coupon)
                for i in range(start, min(start + per_message, claims))
            ]
            message_id, body = encode_claims(commands)
            message = aio_pika.Message(
                body,
                message_id=message_id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                app_id="flashclaim-bench",
                type=CLAIM_EVENT,
            )
            pending.append(asyncio.ensure_future(declared.commands.publish(message, coupon)))
            if len(pending) >= 200:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await connection.close()


def wait_applied(settings: Settings, coupon: str, claims: int, timeout: float) -> float:
    """Wait until every claim is applied; the claims per second between the first and
    the last batch's transaction."""
    deadline = time.monotonic() + timeout
    progress = (
        "SELECT count(*), extract(epoch FROM max(claimed_at) - min(claimed_at))"
        " FROM claims WHERE coupon_name = %s"
    )
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        while True:
            cur = conn.execute(progress, (coupon,))
            row = cur.fetchone() or (0, None)
            if row[0] >= claims:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"drain: {row[0]} of {claims} applied in {timeout:.0f} s")
            time.sleep(0.2)
    seconds = float(row[1] or 0)
    return claims / seconds if seconds > 0 else float("nan")


def pending_events(settings: Settings) -> int:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM outbox WHERE status = 'PENDING'").fetchone()
    return int(row[0]) if row else 0


def wait_relayed(settings: Settings, coupon: str, timeout: float) -> tuple[int, float]:
    """Wait until no event of ``coupon`` is pending; its events and the events per
    second between the first and the last relay transaction that sent them."""
    deadline = time.monotonic() + timeout
    progress = (
        "SELECT count(*) FILTER (WHERE status = 'PENDING'), count(*),"
        " extract(epoch FROM max(sent_at) - min(sent_at))"
        " FROM outbox WHERE aggregate = %s"
    )
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        while True:
            row = conn.execute(progress, (coupon,)).fetchone() or (1, 0, None)
            if row[0] == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"relay: {row[0]} events still pending after {timeout:.0f} s")
            time.sleep(0.2)
    seconds = float(row[2] or 0)
    return int(row[1]), (row[1] / seconds if seconds > 0 else float("nan"))
