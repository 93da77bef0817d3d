"""The services with accounts of least privilege, as `make run` gives them: a sale works
end to end (claims, answers, events, dead letters), and each account is refused what
lies beyond it (flashclaim/core/privileges.py)."""

from __future__ import annotations

import asyncio
import base64
import uuid

import aio_pika
import aiohttp
import psycopg
import pytest
import redis
from aiormq.exceptions import ChannelAccessRefused

from flashclaim.core.policies import apply_configured
from flashclaim.core.settings import Settings
from flashclaim.devtools.devstack import Stack
from tests.acceptance.conftest import Services
from tests.acceptance.test_contract import call, claim, create
from tests.conftest import make_settings


@pytest.fixture
def least(own_servers: Stack, namespace: str) -> Settings:
    """Settings with the services' accounts; the policies set by the administrator."""
    admin = make_settings(own_servers, namespace)
    urls = own_servers.service_urls(namespace)
    return admin.replace(
        database_url=urls["FLASHCLAIM_DATABASE_URL"],
        amqp_url=urls["FLASHCLAIM_AMQP_URL"],
        redis_url=urls["FLASHCLAIM_REDIS_URL"],
        amqp_management_url="",
    )


async def test_a_sale_runs_with_the_services_accounts(
    own_servers: Stack, least: Settings, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    admin = make_settings(own_servers, least.namespace)
    await apply_configured(admin)  # the administrator's part: the queues' policies
    services = Services(least)
    try:
        services.start_consumer()
        services.start_relay()
        await services.start_gateway()
        await create(http, services, coupon_name, 5)
        answers = await asyncio.gather(
            *(claim(http, services, f"user{i}", coupon_name) for i in range(20))
        )
        codes = sorted(body.get("code", "claimed") for _, body, _ in answers)
        assert codes == ["claimed"] * 5 + ["out_of_stock"] * 15, answers
        # A winner's answer, kept in Redis by the consumer, read back by the gateway.
        won = next(body for status, body, _ in answers if status == 200)
        url = f"{services.base_url}/api/claims/{won['request_id']}"
        assert (await call(http, "GET", url))[:2] == (200, won)
        # The relay, with the same user, published the sale's events.
        with psycopg.connect(admin.database_url) as conn:
            for _ in range(100):
                pending = conn.execute(
                    "SELECT count(*) FROM outbox WHERE aggregate = %s AND status <> 'SENT'",
                    (coupon_name,),
                ).fetchone()
                sent = conn.execute(
                    "SELECT count(*) FROM outbox WHERE aggregate = %s AND status = 'SENT'",
                    (coupon_name,),
                ).fetchone()
                if pending == (0,) and sent and sent[0] >= 7:
                    break
                await asyncio.sleep(0.1)
            assert (pending, sent) == ((0,), (7,))  # created, 5 claimed, sold out
    finally:
        services.stop()


def test_the_database_role_cannot_change_the_schema(least: Settings) -> None:
    with psycopg.connect(least.database_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM coupons").fetchone() is not None
        for statement in (
            "DROP TABLE claims",
            "ALTER TABLE coupons ADD COLUMN x int",
            "CREATE TABLE intruder (id int)",
            "TRUNCATE claims",
            "UPDATE _yoyo_migration SET migration_hash = migration_hash",
            "CREATE INDEX ON inbox (error)",
            "DROP FUNCTION IF EXISTS outbox_notify() CASCADE",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


async def test_the_broker_user_is_confined_to_its_namespace(
    own_servers: Stack, least: Settings
) -> None:
    connection = await aio_pika.connect(least.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(f"{least.namespace}.scratch", auto_delete=True)
        for name in ("other.queue", f"x{least.namespace}.queue"):
            channel = await connection.channel()
            with pytest.raises(ChannelAccessRefused):
                await channel.declare_queue(name, auto_delete=True)
        # Nor may it publish outside it (the default exchange included).
        channel = await connection.channel()
        with pytest.raises(ChannelAccessRefused):
            await channel.default_exchange.publish(aio_pika.Message(b"x"), "other.queue")
        channel = await connection.channel()
        topic = await channel.get_exchange("amq.topic", ensure=False)
        with pytest.raises(ChannelAccessRefused):
            await topic.publish(aio_pika.Message(b"x"), "k")
    # Not an administrator, nor a user of the management API at all; the administrator's
    # credentials are what it takes.
    services_user = least.amqp_url.split("//")[1].split("@")[0]
    assert await management_status(own_servers, services_user) == 401
    assert await management_status(own_servers, "guest:guest") == 200


async def management_status(stack: Stack, credentials: str) -> int:
    """The status of the broker's management API's overview, asked with ``credentials``
    (``user:password``)."""
    assert stack.rabbitmq is not None
    basic = base64.b64encode(credentials.encode()).decode()
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{stack.rabbitmq.management_url}api/overview",
            headers={"Authorization": f"Basic {basic}"},
        ) as response,
    ):
        return response.status


def test_the_redis_user_has_its_commands_on_its_keys_only(least: Settings) -> None:
    client = redis.Redis.from_url(least.redis_url)
    try:
        key = f"{least.namespace}:probe:{uuid.uuid4()}"
        client.set(key, b"1", ex=10)
        assert client.get(key) == b"1"
        for command in (
            ("GET", "other:key"),
            ("SET", f"x{least.namespace}:key", "1"),
            ("FLUSHALL",),
            ("CONFIG", "GET", "*"),
            ("KEYS", "*"),
            ("DEL", key),
            ("PUBLISH", "other:channel", "x"),
            ("ACL", "LIST"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)  # type: ignore[no-untyped-call]
    finally:
        client.close()
