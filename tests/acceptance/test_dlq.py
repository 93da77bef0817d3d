"""Operators' dead-letter tools against a real broker, consumer and database.

Dead letters of three kinds are made for real: a command over the broker's delivery
limit, a poison message, and a command whose handler keeps failing (the database
refuses it). Then every operation is checked, including an interrupted replay.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiohttp
import psycopg
import pytest
import redis.asyncio as aioredis

from flashclaim.core.messages import ClaimCommand
from flashclaim.core.policies import apply_configured
from flashclaim.core.settings import Settings
from tests.acceptance.conftest import LOGS, Services, free_port, service_env
from tests.conftest import create_coupon_row


def dlq(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flashclaim.cli", "dlq", *args],
        env=service_env(settings),
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def dlq_json(settings: Settings, *args: str) -> Any:
    result = dlq(settings, *args, "--json")
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


async def depth(settings: Settings) -> int:
    async with await aio_pika.connect(settings.amqp_url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.topology().claims_dlq, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def wait_depth(settings: Settings, expected: int) -> None:
    for _ in range(300):
        if await depth(settings) == expected:
            return
        await asyncio.sleep(0.1)
    assert await depth(settings) == expected


def claims_of(settings: Settings, coupon: str) -> list[tuple[str, str]]:
    with psycopg.connect(settings.database_url) as conn:
        return [
            (r[0], r[1])
            for r in conn.execute(
                "SELECT user_id, message_id::text FROM claims WHERE coupon_name = %s ORDER BY id",
                (coupon,),
            ).fetchall()
        ]


@dataclass
class Letters:
    coupon: str
    over_limit: str
    poison: str
    failed: str


async def publish(settings: Settings, command: ClaimCommand, body: bytes | None = None) -> None:
    await apply_configured(settings)  # the delivery limit and dead-lettering are policies
    async with await aio_pika.connect(settings.amqp_url) as connection:
        channel = await connection.channel()
        declared = await settings.topology().declare(channel)
        await declared.commands.publish(
            aio_pika.Message(
                body or command.body(),
                message_id=str(command.request_id),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            command.coupon_name,
        )


async def over_the_delivery_limit(settings: Settings, command: ClaimCommand) -> None:
    """A consumer that gives every delivery back until the broker dead-letters it."""
    await publish(settings, command)
    async with await aio_pika.connect(settings.amqp_url) as connection:
        channel = await connection.channel()
        declared = await settings.topology().declare(channel)

        async def refuse(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.nack(requeue=True)

        for queue in declared.claims:
            await queue.consume(refuse)
        await wait_depth(settings, 1)


@pytest.fixture
async def letters(
    services: Services, settings: Settings, coupon_name: str, exploding_user: str
) -> Letters:
    create_coupon_row(settings.database_url, coupon_name, 10)
    over_limit = ClaimCommand(uuid.uuid4(), "limit_user", coupon_name)
    await over_the_delivery_limit(settings, over_limit)
    services.start_consumer()
    await services.start_gateway(claim_wait_seconds=0.5)
    poison = ClaimCommand(uuid.uuid4(), "x", coupon_name)
    await publish(settings, poison, body=b'{"v": 1, "user_id": ')
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{services.base_url}/api/coupons/claim",
            json={"user_id": exploding_user, "coupon_name": coupon_name},
        ) as r,
    ):
        failed = (await r.json())["request_id"]
    await wait_depth(settings, 3)
    return Letters(coupon_name, str(over_limit.request_id), str(poison.request_id), failed)


async def test_stats_list_and_show(settings: Settings, letters: Letters) -> None:
    stats = dlq_json(settings, "stats")
    (queue,) = stats.values()
    assert queue["depth"] == 3
    assert queue["by_reason"] == {"delivery_limit": 1, "poison": 1, "failed": 1}
    assert queue["by_error_type"]["PoisonMessage"] == 1
    assert queue["by_error_type"]["RaiseException"] == 1
    assert queue["oldest_age_seconds"] >= 0

    listed = dlq_json(settings, "list")
    assert {x["message_id"] for x in listed} == {
        letters.over_limit,
        letters.poison,
        letters.failed,
    }
    assert [x["message_id"] for x in dlq_json(settings, "list", "--reason", "poison")] == [
        letters.poison
    ]
    by_coupon = dlq_json(settings, "list", "--coupon", letters.coupon)
    assert {x["message_id"] for x in by_coupon} == {letters.over_limit, letters.failed}
    assert dlq_json(settings, "list", "--older-than", "3600") == []
    assert len(dlq_json(settings, "list", "--limit", "1")) == 1
    table = dlq(settings, "list")
    assert "MESSAGE_ID" in table.stdout and letters.poison in table.stdout

    shown = dlq_json(settings, "show", letters.over_limit)
    assert shown["reason"] == "delivery_limit"
    assert shown["original_exchange"] == settings.topology().commands_exchange
    assert shown["original_routing_key"] == letters.coupon
    assert shown["headers"]["x-death"][0]["reason"] == "delivery_limit"
    assert json.loads(shown["body"])["user_id"] == "limit_user"
    failed = dlq_json(settings, "show", letters.failed)
    assert "refusing claims" in failed["error"]
    assert dlq(settings, "show", str(uuid.uuid4())).returncode == 1
    # Peeking moved nothing.
    assert await depth(settings) == 3


async def test_replay_by_id_and_filter_applies_each_claim_once(
    services: Services, settings: Settings, letters: Letters, exploding_user: str
) -> None:
    dry = dlq_json(settings, "replay", "--all", "--dry-run")
    assert dry["count"] == 3
    assert await depth(settings) == 3  # a dry run moves nothing
    # Its client, following its claim, is told it waits for an operator.
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{services.base_url}/api/claims/{letters.failed}") as r,
    ):
        assert (r.status, (await r.json())["status"]) == (202, "dead_lettered")

    assert dlq(settings, "replay", letters.over_limit).returncode == 0
    await wait_depth(settings, 2)
    for _ in range(100):
        if claims_of(settings, letters.coupon):
            break
        await asyncio.sleep(0.1)
    assert claims_of(settings, letters.coupon) == [("limit_user", letters.over_limit)]

    # The bug is fixed (the trigger goes away), the failed claim is replayed by filter.
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        trigger = f"explode_{exploding_user.replace('-', '_')}"
        conn.execute(f"DROP TRIGGER {trigger} ON claims")
    assert dlq(settings, "replay", "--reason", "failed").returncode == 0
    await wait_depth(settings, 1)
    for _ in range(100):
        if len(claims_of(settings, letters.coupon)) == 2:
            break
        await asyncio.sleep(0.1)
    assert sorted(u for u, _ in claims_of(settings, letters.coupon)) == sorted(
        ["limit_user", exploding_user]
    )
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{services.base_url}/api/claims/{letters.failed}") as r,
    ):
        assert (r.status, (await r.json())["status"]) == (200, "claimed")

    # The same claim dead-lettered and replayed again is a no-op with the same answer:
    # once the queues have drained, its inbox row and its answer are what they were.
    before = inbox_row(settings, letters.over_limit)
    await publish_dead_letter(settings, letters.over_limit, "limit_user", letters.coupon)
    # The consumer answers a duplicate from the inbox and stores that answer again: its
    # reappearing result says the replayed copy has been handled.
    result_key = f"{settings.namespace}:result:{letters.over_limit}"
    async with aioredis.from_url(settings.redis_url) as redis:
        assert await redis.delete(result_key) == 1
        assert dlq(settings, "replay", letters.over_limit).returncode == 0
        await wait_depth(settings, 1)
        for _ in range(100):
            if await redis.exists(result_key):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the replayed copy was never handled")
    assert inbox_row(settings, letters.over_limit) == before
    assert [m for _, m in claims_of(settings, letters.coupon)].count(letters.over_limit) == 1
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{services.base_url}/api/claims/{letters.over_limit}") as r,
    ):
        answered = (r.status, await r.json())
    assert before[2] == "claimed"  # and that is its answer, as it was the first time
    assert answered == (
        200,
        {
            "status": "claimed",
            "user_id": "limit_user",
            "coupon_name": letters.coupon,
            "request_id": letters.over_limit,
        },
    )
    # Replaying what is not there says so.
    assert dlq(settings, "replay", str(uuid.uuid4())).returncode == 1


async def test_replay_after_the_coupon_sold_out_answers_out_of_stock(
    services: Services, settings: Settings, letters: Letters, exploding_user: str
) -> None:
    """While a claim waits in the DLQ the coupon sells out: its replay is decided
    against today's stock (400 out_of_stock, recorded in the inbox), never an oversell."""
    async with aiohttp.ClientSession() as http:
        for i in range(10):
            async with http.post(
                f"{services.base_url}/api/coupons/claim",
                json={"user_id": f"buyer_{i}", "coupon_name": letters.coupon},
            ) as r:
                assert r.status == 200, await r.text()
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(f"DROP TRIGGER explode_{exploding_user.replace('-', '_')} ON claims")
        assert dlq(settings, "replay", letters.failed).returncode == 0
        for _ in range(100):
            async with http.get(f"{services.base_url}/api/claims/{letters.failed}") as r:
                status, body = r.status, await r.json()
            if status != 202:
                break
            await asyncio.sleep(0.1)
    assert (status, body["code"]) == (400, "out_of_stock"), body
    assert inbox_row(settings, letters.failed)[:3] == (
        "PROCESSED",
        settings.max_attempts,
        "out_of_stock",
    )
    holders = [u for u, _ in claims_of(settings, letters.coupon)]
    assert len(holders) == 10 and exploding_user not in holders
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute(
            "SELECT remaining_amount FROM coupons WHERE name = %s", (letters.coupon,)
        ).fetchone() == (0,)


def inbox_row(settings: Settings, message_id: str) -> tuple[object, ...]:
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(
            "SELECT status, retry_count, outcome, updated_at FROM inbox WHERE message_id = %s",
            (message_id,),
        ).fetchone()
    assert row is not None
    return tuple(row)


async def publish_dead_letter(settings: Settings, message_id: str, user: str, coupon: str) -> None:
    """A dead letter as a consumer would have moved it (headers and all)."""
    topology = settings.topology()
    async with await aio_pika.connect(settings.amqp_url) as connection:
        channel = await connection.channel()
        await topology.declare(channel)
        dlx = await channel.get_exchange(topology.dead_letter_exchange)
        body = ClaimCommand(uuid.UUID(message_id), user, coupon).body()
        await dlx.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                headers={
                    "x-flashclaim-reason": "failed",
                    "x-flashclaim-error-type": "Test",
                    "x-flashclaim-original-exchange": topology.commands_exchange,
                    "x-flashclaim-original-routing-key": coupon,
                },
            ),
            "claim",
        )


async def test_purge_needs_confirmation_and_is_audited(
    settings: Settings, letters: Letters
) -> None:
    refused = dlq(settings, "purge", "--reason", "poison")
    assert refused.returncode == 3  # no terminal to confirm on, no --yes
    assert await depth(settings) == 3
    assert dlq(settings, "purge").returncode == 2  # no selection at all
    done = dlq(settings, "purge", "--reason", "poison", "--yes")
    assert done.returncode == 0, done.stderr
    assert await depth(settings) == 2
    audit = [json.loads(line) for line in done.stderr.splitlines() if '"audit"' in line]
    assert audit and audit[0]["action"] == "purge"
    assert audit[0]["message_ids"] == [letters.poison]


async def test_purge_removes_exactly_what_was_confirmed(
    settings: Settings, letters: Letters, coupon_name: str
) -> None:
    """A dead letter that arrives while the operator reads the prompt is not purged
    with the ones they were shown, even though it matches the same filter."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(  # noqa: ASYNC220 - a pty-driven CLI, as an operator runs it
        [sys.executable, "-m", "flashclaim.cli", "dlq", "purge", "--reason", "poison"],
        env=service_env(settings),
        stdin=follower,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(follower)
    try:
        assert proc.stdout is not None
        prompt = await asyncio.to_thread(proc.stdout.read, len("Remove 1 dead letters"))
        assert prompt == b"Remove 1 dead letters"
        late = ClaimCommand(uuid.uuid4(), "late", coupon_name)
        await publish(settings, late, body=b"not json either")
        await wait_depth(settings, 4)
        os.write(leader, b"y\n")
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 0, err
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert await depth(settings) == 3
    remaining = dlq_json(settings, "list", "--reason", "poison")
    assert [x["message_id"] for x in remaining] == [str(late.request_id)]


async def test_selections_refuse_nan_and_negative_ages(
    services: Services, settings: Settings, letters: Letters
) -> None:
    for bad in ("nan", "inf", "-5"):
        result = dlq(settings, "list", "--older-than", bad)
        assert result.returncode == 2, result.stdout
        assert "number of seconds" in result.stderr
    assert dlq(settings, "purge", "--older-than", "nan", "--yes").returncode == 2
    assert await depth(settings) == 3
    port = free_port()
    admin = Services(settings)
    try:
        await admin.start_admin(port, admin_token="t" * 32)
        good = {"Authorization": f"Bearer {'t' * 32}"}
        base = f"http://127.0.0.1:{port}/admin/dlq"
        async with aiohttp.ClientSession(headers=good) as http:
            async with http.get(f"{base}/messages?older_than=nan") as r:
                assert (r.status, (await r.json())["code"]) == (400, "invalid_request")
            async with http.post(
                f"{base}/purge", data=b'{"older_than": 1e999, "confirm": true}'
            ) as r:
                assert r.status == 400
    finally:
        admin.stop()
    assert await depth(settings) == 3


async def test_admin_api_binds_loopback_needs_a_long_token_and_audits_the_caller(
    settings: Settings, letters: Letters
) -> None:
    admin = Services(settings)
    port = free_port()
    try:
        with pytest.raises(RuntimeError, match="exited with 2"):
            await admin.start_admin(port, admin_token="short-token")
        # The public API on every address; the admin API still on loopback only.
        instance = f"admin-{uuid.uuid4().hex[:8]}"
        token = "k" * 40
        await admin.start_gateway(http_host="0.0.0.0")
        await admin.start_admin(port, admin_token=token, http_host="0.0.0.0", instance_id=instance)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.2:{admin.port}/healthz") as r:
                assert r.status == 200
            with pytest.raises(aiohttp.ClientConnectionError):
                async with http.get(f"http://127.0.0.2:{port}/admin/dlq"):
                    pass
            async with http.post(
                f"http://127.0.0.1:{port}/admin/dlq/purge",
                headers={"Authorization": f"Bearer {token}", "X-Operator": "ops-alice"},
                json={"reason": "poison", "confirm": True},
            ) as r:
                assert (await r.json())["count"] == 1
    finally:
        admin.stop()
    log = (LOGS / f"{settings.namespace}-{instance}.log").read_text()
    (audit,) = [json.loads(line) for line in log.splitlines() if '"audit"' in line]
    assert audit["operator"] == "ops-alice via http from 127.0.0.1"
    assert audit["message_ids"] == [letters.poison]


async def test_export_writes_json_lines_and_removes_nothing(
    settings: Settings, letters: Letters, tmp_path: object
) -> None:
    result = dlq(settings, "export")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["message_id"] for r in rows} == {letters.over_limit, letters.poison, letters.failed}
    assert all("headers" in r and "body" in r for r in rows)
    assert await depth(settings) == 3


def start_slow_replay(settings: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "flashclaim.cli", "dlq", "replay", "--all", "--rate", "10"],
        env=service_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def test_interrupted_replay_loses_nothing(
    services: Services, settings: Settings, coupon_name: str
) -> None:
    create_coupon_row(settings.database_url, coupon_name, 100)
    services.start_consumer()
    ids = [str(uuid.uuid4()) for _ in range(40)]
    for i, message_id in enumerate(ids):
        await publish_dead_letter(settings, message_id, f"user_{i}", coupon_name)
    await wait_depth(settings, 40)
    replay = start_slow_replay(settings)
    assert replay.stderr is not None
    for _ in range(100):  # let some go, then kill it mid-way
        if "(5)" in replay.stderr.readline().decode():
            break
    replay.send_signal(signal.SIGKILL)
    replay.wait()
    replay.stderr.close()
    # Every message is applied or still dead-lettered (never neither), once what the
    # replay had in hand is back in the DLQ and what it had sent is applied.
    for _ in range(100):
        applied = {m for _, m in claims_of(settings, coupon_name)}
        waiting = await depth(settings)
        if len(applied) + waiting >= 40:
            break
        await asyncio.sleep(0.1)
    assert 0 < len(applied) < 40
    assert len(applied) + waiting >= 40
    assert dlq(settings, "replay", "--all").returncode == 0
    for _ in range(100):
        if len(claims_of(settings, coupon_name)) == 40:
            break
        await asyncio.sleep(0.1)
    assert sorted(m for _, m in claims_of(settings, coupon_name)) == sorted(ids)
    assert await depth(settings) == 0


async def test_admin_api_needs_the_bearer_token(
    services: Services, settings: Settings, letters: Letters
) -> None:
    port = free_port()
    token = uuid.uuid4().hex
    admin = Services(settings)
    try:
        await admin.start_gateway(admin_token=token)
        await admin.start_admin(port, admin_token=token)
        base = f"http://127.0.0.1:{port}/admin/dlq"
        async with aiohttp.ClientSession() as http:
            async with http.get(base) as r:
                assert r.status == 401
                assert (await r.json())["code"] == "unauthorized"
            async with http.get(base, headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            # Without the token nothing moves or goes.
            for action, body in (
                ("replay", {"all": True}),
                ("purge", {"all": True, "confirm": True}),
            ):
                async with http.post(f"{base}/{action}", json=body) as r:
                    assert r.status == 401
            assert await depth(settings) == 3
            good = {"Authorization": f"Bearer {token}"}
            async with http.get(base, headers=good) as r:
                assert r.status == 200
                (queue,) = (await r.json()).values()
                assert queue["depth"] == 3
            async with http.get(f"{base}/messages?reason=poison", headers=good) as r:
                assert [x["message_id"] for x in await r.json()] == [letters.poison]
            async with http.get(f"{base}/messages/{letters.failed}", headers=good) as r:
                assert (await r.json())["reason"] == "failed"
            async with http.post(
                f"{base}/replay", headers=good, json={"all": True, "dry_run": True}
            ) as r:
                assert (await r.json())["count"] == 3
            async with http.post(f"{base}/purge", headers=good, json={"all": True}) as r:
                assert r.status == 400  # no "confirm": true
            async with http.post(
                f"{base}/purge", headers=good, json={"reason": "poison", "confirm": True}
            ) as r:
                assert (await r.json())["count"] == 1
            # The public port does not serve the admin API.
            async with http.get(f"{admin.base_url}/admin/dlq", headers=good) as r:
                assert r.status == 404
    finally:
        admin.stop()
    assert await depth(settings) == 2


async def test_a_replay_that_cannot_be_done_whole_is_refused_and_moves_nothing(
    settings: Settings, letters: Letters
) -> None:
    """A dead letter with no exchange to go back to (not dead-lettered by flashclaim) in
    a selection: 400 and nothing replayed, not a replay cut short; and a ``dry_run`` that
    is not a boolean ("true" as text) is refused, not taken for a real replay."""
    topology = settings.topology()
    stranded = str(uuid.uuid4())
    async with await aio_pika.connect(settings.amqp_url) as connection:
        channel = await connection.channel()
        dlx = await channel.get_exchange(topology.dead_letter_exchange)
        body = ClaimCommand(uuid.UUID(stranded), "s", letters.coupon).body()
        await dlx.publish(
            aio_pika.Message(body, message_id=stranded, headers={"x-flashclaim-reason": "failed"}),
            "claim",
        )
    await wait_depth(settings, 4)
    admin = Services(settings)
    port = free_port()
    token = "r" * 40
    try:
        await admin.start_admin(port, admin_token=token)
        base = f"http://127.0.0.1:{port}/admin/dlq"
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as http:
            for selection in ({"all": True}, {"reason": "failed", "dry_run": True}):
                async with http.post(f"{base}/replay", json=selection, headers=auth) as r:
                    assert r.status == 400
                    answer = await r.json()
                    assert answer["code"] == "invalid_request" and stranded in answer["error"]
            async with http.post(
                f"{base}/replay", json={"all": True, "dry_run": "true"}, headers=auth
            ) as r:
                assert r.status == 400
                assert "dry_run" in (await r.json())["error"]
    finally:
        admin.stop()
    assert await depth(settings) == 4
    refused = dlq(settings, "replay", "--all")
    assert refused.returncode == 2 and stranded in refused.stderr
    assert await depth(settings) == 4
