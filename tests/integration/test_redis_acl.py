"""Redis started with the command line docker-compose.yml gives it (Debian's server):
the services' user runs every Redis path of flashclaim's code, and nothing beyond."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import yaml

from flashclaim.core.errors import RateLimited
from flashclaim.core.messages import ClaimCommand, ClaimResult, Outcome
from flashclaim.core.results import ResultStore, redis_client
from flashclaim.devtools.devstack import wait_for_port
from gateway.ratelimit import RateLimiter
from gateway.replies import ReplyListener
from tests.acceptance.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    server, *args = compose["services"]["redis"]["command"]
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [f"/usr/bin/{server}", *args, "--port", str(port), "--bind", "127.0.0.1"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 30, proc, "redis")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def test_the_services_user_runs_flashclaims_redis_paths(compose_redis: int) -> None:
    client = redis_client(f"redis://flashclaim_app:flashclaim_app@127.0.0.1:{compose_redis}/0")
    store = ResultStore(client, "flashclaim", 60, 30)
    listener = ReplyListener(client, store.reply_channel("gw-1"))
    try:
        await listener.start()
        request = ClaimCommand(uuid.uuid4(), "alice", "PROMO")
        waiting = listener.expect(request.request_id)
        await store.mark_pending(request.request_id, "alice")
        assert await store.pending_owner(request.request_id) == "alice"
        result = ClaimResult.of(request, Outcome.CLAIMED, remaining=3)
        await store.publish([(result, listener.channel)])  # a script: SET and PUBLISH
        assert await asyncio.wait_for(waiting, 5) == result
        assert await store.get(request.request_id) == result
        fast = ClaimResult.of(ClaimCommand(uuid.uuid4(), "bob", "PROMO"), Outcome.OUT_OF_STOCK)
        await store.store_gateway_answers([fast])
        assert await store.get(fast.request_id) == fast
        assert await store.recall(request.request_id, b"y") == result  # a script
        assert await store.recall(fast.request_id, b"y") == fast
        first = uuid.uuid4()
        assert await store.recall(first, b"x") == b"x"
        assert await store.recall(first, b"y") == b"x"
        limiter = RateLimiter(client, "flashclaim", per_second=1, burst=1)
        await limiter.check("user:alice")  # EVALSHA, loaded on first use
        with pytest.raises(RateLimited):
            await limiter.check("user:alice")
        await client.ping()
    finally:
        await listener.stop()
        await client.aclose()


def test_nothing_beyond_and_no_default_user(compose_redis: int) -> None:
    services = redis.Redis(port=compose_redis, username="flashclaim_app", password="flashclaim_app")
    anonymous = redis.Redis(port=compose_redis)
    admin = redis.Redis(port=compose_redis, username="admin", password="admin")
    try:
        for command in (
            ("GET", "other:key"),
            ("FLUSHALL",),
            ("CONFIG", "SET", "maxmemory", "0"),
            ("KEYS", "*"),
            ("SUBSCRIBE", "other:channel"),
            ("ACL", "SETUSER", "flashclaim_app", "+@all"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                services.execute_command(*command)  # type: ignore[no-untyped-call]
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
        assert admin.ping() and admin.config_get("maxmemory-policy") == {
            "maxmemory-policy": "volatile-lru"
        }
    finally:
        for client in (services, anonymous, admin):
            client.close()


def test_an_unknown_user_is_refused(compose_redis: int) -> None:
    client = aioredis.Redis(port=compose_redis, username="nobody", password="x")

    async def ping() -> None:
        try:
            await client.ping()
        finally:
            await client.aclose()

    with pytest.raises(redis.exceptions.AuthenticationError):
        asyncio.run(ping())
