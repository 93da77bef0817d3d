"""Redis through Sentinel (``redis+sentinel://``), against a real Sentinel watching the
suite's Redis: what Kubernetes deployments use for Redis failover."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from flashclaim.core.privileges import redis_acl_setuser
from flashclaim.core.results import SentinelAddress, redis_client
from flashclaim.core.settings import Settings
from flashclaim.devtools.devstack import Stack
from tests.acceptance.conftest import free_port


def start_sentinel(
    stack: Stack, tmp_path: Path, password: str = ""
) -> tuple[subprocess.Popen[bytes], int]:
    """A Sentinel watching the suite's Redis as master ``flashclaim``; its port."""
    if stack.redis is None:
        pytest.skip("needs the suite's own Redis")
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor flashclaim 127.0.0.1 {stack.redis.port} 1\n"
        + (f"requirepass {password}\n" if password else "")
    )
    proc = subprocess.Popen(
        [server, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, port


@pytest.fixture
def sentinel(stack: Stack, tmp_path: Path) -> Iterator[int]:
    if stack.redis is None:
        pytest.skip("needs the suite's own Redis")
    proc, port = start_sentinel(stack, tmp_path)
    yield port
    proc.terminate()
    proc.wait(10)


async def test_an_acl_user_behind_a_sentinel_with_its_own_password(
    stack: Stack, tmp_path: Path, settings: Settings
) -> None:
    """Kubernetes' Redis: the services' ACL user on the master, the Sentinels guarded by
    the default user's password (REDIS_SENTINEL_PASSWORD)."""
    if stack.redis is None:
        pytest.skip("needs the suite's own Redis")
    proc, port = start_sentinel(stack, tmp_path, password="sentinel-secret")
    user = f"acl-{settings.namespace}"
    admin = aioredis.Redis(port=stack.redis.port)
    await admin.execute_command(*redis_acl_setuser(user, "app-secret", settings.namespace))  # type: ignore[no-untyped-call]
    url = f"redis+sentinel://{user}:app-secret@127.0.0.1:{port}/flashclaim/0"
    try:
        client = redis_client(url, sentinel_password="sentinel-secret")
        await client.set(f"{settings.namespace}:k", "v", ex=10)
        assert await client.get(f"{settings.namespace}:k") == b"v"
        with pytest.raises(redis.exceptions.NoPermissionError):
            await client.get("elsewhere")
        await client.aclose()
        # Without the Sentinel's own password, the URL's is tried there, and refused.
        client = redis_client(url)
        with pytest.raises(redis.exceptions.RedisError):
            await client.ping()
        await client.aclose()
    finally:
        await admin.execute_command("ACL", "DELUSER", user)  # type: ignore[no-untyped-call]
        await admin.aclose()
        proc.terminate()
        proc.wait(10)


async def test_a_sentinel_url_reaches_the_master_it_names(sentinel: int) -> None:
    client = redis_client(f"redis+sentinel://127.0.0.1:{sentinel}/flashclaim/0")
    try:
        await client.set("sentinel-test", "here", ex=10)
        assert await client.get("sentinel-test") == b"here"
        # Results reach the gateways through pub/sub on the same client.
        pubsub = client.pubsub()
        await pubsub.subscribe("sentinel-channel")
        await client.publish("sentinel-channel", "hello")
        async with asyncio.timeout(5):
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    break
        assert message["data"] == b"hello"
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


async def test_a_master_no_sentinel_knows_is_an_error(sentinel: int) -> None:
    client = redis_client(f"redis+sentinel://127.0.0.1:{sentinel}/nobody/0")
    try:
        with pytest.raises(Exception, match="nobody"):
            await client.ping()
    finally:
        await client.aclose()


def test_the_sentinel_url_names_hosts_master_database_and_password() -> None:
    address = SentinelAddress.parse("redis+sentinel://:p%40ss@a:26379,b:26380/mymaster/2")
    assert address.sentinels == [("a", 26379), ("b", 26380)]
    assert (address.master, address.db, address.password) == ("mymaster", 2, "p@ss")
    default = SentinelAddress.parse("redis+sentinel://redis-sentinel/mymaster")
    assert (default.sentinels, default.db, default.password) == (
        [("redis-sentinel", 26379)],
        0,
        None,
    )
    with pytest.raises(ValueError, match="master"):
        SentinelAddress.parse("redis+sentinel://a:26379/")
