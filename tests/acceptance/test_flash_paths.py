"""The flash-sale paths keep every guarantee: claims held back while the stock is
covered (gateway/admission.py), claims coalesced into one message (gateway/coalescer.py)
and messages of several claims in the consumer (consumer/worker.py, step 5)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid

import aio_pika
import aiohttp
import psycopg

from flashclaim.core.messages import ClaimCommand, encode_claims
from flashclaim.core.settings import Settings
from flashclaim.devtools.client import ClaimClient
from tests.acceptance.conftest import Services, service_env, until_queued
from tests.acceptance.load import Load, verify
from tests.conftest import create_coupon_row


def inbox_rows(settings: Settings, coupon: str) -> int:
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM inbox WHERE payload ->> 'coupon_name' = %s", (coupon,)
        ).fetchone()
    return int(row[0]) if row else 0


async def test_a_burst_answers_exactly_the_stock_and_its_losers_skip_the_pipeline(
    services: Services, http: aiohttp.ClientSession, settings: Settings
) -> None:
    """3,000 claims, 1,000 at a time, through two gateway processes, for 100 in stock:
    exactly 100 winners, every answer equal to the database's; and most losers were
    answered by the gateway without a command (their claims never reached the inbox)."""
    # A hold longer than any result takes here, so that none runs out on a slow machine.
    services.gateway_overrides = {"gateway_workers": 2, "claim_hold_seconds": 5.0}
    services.start_consumer()
    await services.start_gateway()
    load = await Load(
        services, http, claims=3000, coupons=1, stock=100, users=10**9, concurrency=1000
    ).start()
    answers = await load.finish()
    await verify(settings, load, answers)
    assert sum(a.status == 200 for a in answers) == 100
    # Each gateway process publishes about as many claims as there is stock left, and
    # holds the rest until the sell-out is known: at most 2 x 100 commands, plus claims
    # of a place given back. Without holding, every claim sent before the first result
    # came back becomes a command.
    # (Seen here: 135 commands with holding, 570 without.)
    assert inbox_rows(settings, load.names[0]) <= 300


async def test_a_held_claim_is_published_when_the_hold_runs_out_and_then_answered(
    services: Services, http: aiohttp.ClientSession, settings: Settings
) -> None:
    """No consumer runs, so no result comes back: the claims beyond the stock are held
    (not published) for the hold, then published; once a consumer runs, every one of
    them gets the consumer's answer. Nothing held is dropped."""
    services.gateway_overrides = {"claim_hold_seconds": 2.0, "claim_wait_seconds": 4.0}
    await services.start_gateway()
    coupon = f"HOLD_{uuid.uuid4().hex[:8]}"
    await services.create_coupons(http, 1, coupon)
    client = ClaimClient(http, services.base_url, deadline=60)
    first = asyncio.create_task(client.claim("user_0", coupon))
    assert await until_queued(settings, 1) == 1
    held = [asyncio.create_task(client.claim(f"user_{i}", coupon)) for i in range(1, 6)]
    await asyncio.sleep(0.5)
    assert await until_queued(settings, 99, timeout=0.1) == 1  # held back, not published
    assert await until_queued(settings, 2, timeout=10) >= 2  # published after the hold
    services.start_consumer()
    answers = await asyncio.gather(first, *held)
    assert sorted(a.status for a in answers) == [200, 400, 400, 400, 400, 400]
    assert inbox_rows(settings, coupon) == 6


async def test_a_consumer_killed_amid_messages_of_many_claims_loses_and_doubles_nothing(
    services: Services, settings: Settings
) -> None:
    """10,000 claims in messages of 50 for 5,000 in stock; the consumer is frozen, then
    killed, while it holds some of them; another takes over. Every claim ends with one
    recorded answer, 5,000 granted to distinct users, and the audit passes."""
    coupon = f"KILL_{uuid.uuid4().hex[:8]}"
    create_coupon_row(settings.database_url, coupon, 5000)
    commands = [ClaimCommand(uuid.uuid4(), f"user_{i}", coupon) for i in range(10_000)]
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        declared = await settings.topology().declare(channel)
        for start in range(0, len(commands), 50):
            message_id, body = encode_claims(commands[start : start + 50])
            await declared.commands.publish(
                aio_pika.Message(
                    body, message_id=message_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                ),
                coupon,
            )
    finally:
        await connection.close()
    victim = services.start_consumer(batch_size=500)
    for _ in range(600):
        if inbox_rows(settings, coupon) >= 1000:
            break
        await asyncio.sleep(0.05)
    os.kill(victim.pid, signal.SIGSTOP)  # it holds deliveries it has not acknowledged
    await asyncio.sleep(0.5)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert 0 < inbox_rows(settings, coupon) < 10_000  # the kill came amid the work
    services.start_consumer(batch_size=500)
    with psycopg.connect(settings.database_url) as conn:
        for _ in range(1200):
            row = conn.execute(
                "SELECT count(*) FROM inbox WHERE payload ->> 'coupon_name' = %s"
                " AND status = 'PROCESSED'",
                (coupon,),
            ).fetchone()
            if row == (10_000,):
                break
            await asyncio.sleep(0.05)
        assert row == (10_000,)
        assert conn.execute(
            "SELECT count(*), count(DISTINCT user_id) FROM claims WHERE coupon_name = %s",
            (coupon,),
        ).fetchone() == (5000, 5000)
        assert conn.execute(
            "SELECT remaining_amount FROM coupons WHERE name = %s", (coupon,)
        ).fetchone() == (0,)
        statuses: dict[str, int] = dict(
            conn.execute(
                "SELECT outcome, count(*) FROM inbox WHERE payload ->> 'coupon_name' = %s"
                " GROUP BY outcome",
                (coupon,),
            ).fetchall()
        )
    assert statuses == {"claimed": 5000, "out_of_stock": 5000}
    audit = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "flashclaim.cli", "audit", "--coupon", coupon],
        env=service_env(settings),
        capture_output=True,
        text=True,
        check=False,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr
