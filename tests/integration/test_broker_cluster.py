"""A broker URL with several hosts (a cluster's nodes): each connection attempt tries
them in turn, and a connection whose node goes away moves to the next one, its
consumers with it. Each "node" here is a proxy to the suite's broker that the test cuts.
"""

from __future__ import annotations

import asyncio
import gc
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import cast

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from flashclaim.core import broker, policies
from flashclaim.core.errors import DependencyUnavailable
from flashclaim.core.settings import Settings
from tests.acceptance.conftest import free_port
from tests.proxy import Proxy


@pytest.fixture
def nodes(settings: Settings) -> Iterator[list[Proxy]]:
    proxies = [Proxy.before(settings.amqp_url)[0] for _ in range(3)]
    yield proxies
    for proxy in proxies:
        proxy.close()


def cluster_url(*ports: int) -> str:
    return "amqp://guest:guest@" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/"


def port_of(connection: AbstractRobustConnection) -> int | None:
    """The port of the node the connection is on now."""
    return cast(broker.ClusterConnection, connection).url.port


async def test_the_first_address_that_answers_takes_the_connection(nodes: list[Proxy]) -> None:
    nodes[0].cut()  # refuses connections, as a node that is down
    url = cluster_url(nodes[0].port, free_port(), nodes[1].port, nodes[2].port)
    connection = await broker.connect(url, "test", wait_seconds=5)
    try:
        assert port_of(connection) == nodes[1].port
        assert broker.is_up(connection)
    finally:
        await connection.close()


async def test_when_no_address_answers_the_first_connection_fails(nodes: list[Proxy]) -> None:
    for node in nodes:
        node.cut()
    with pytest.raises(ConnectionError):
        await broker.connect(cluster_url(*(n.port for n in nodes)), "test", wait_seconds=1)
    # Every failed attempt's connection is closed, not left for aio-pika's __del__ to
    # schedule a close() on whatever loop runs when it is collected (or, with none
    # running, to warn of a coroutine never awaited).
    left_open = [
        c for c in gc.get_objects() if isinstance(c, broker.ClusterConnection) and not c.is_closed
    ]
    assert left_open == []


async def test_a_connection_moves_to_the_next_node_and_keeps_its_consumer(
    nodes: list[Proxy], settings: Settings
) -> None:
    queue_name = f"{settings.namespace}.cluster.{uuid.uuid4().hex[:8]}"
    connection = await broker.connect(cluster_url(*(n.port for n in nodes)), "test", 5)
    received: asyncio.Queue[bytes] = asyncio.Queue()
    seen: set[bytes] = set()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        await received.put(message.body)

    async with await aio_pika.connect(settings.amqp_url) as publisher:
        channel = await publisher.channel()

        async def delivered(body: bytes) -> bytes:
            """Publish ``body``; what the consumer got, once it has it. An earlier body
            may come again first: its ack can be lost with the node (at least once)."""
            await channel.default_exchange.publish(aio_pika.Message(body), queue_name)
            async with asyncio.timeout(15):
                while (got := await received.get()) in seen and got != body:
                    pass
            seen.add(got)
            return got

        try:
            consuming = await connection.channel()
            queue = await consuming.declare_queue(queue_name, auto_delete=False)
            await queue.consume(on_message)
            assert port_of(connection) == nodes[0].port
            assert await delivered(b"on node 0") == b"on node 0"
            # Node 0 goes away: the connection is restored on node 1 (the next address),
            # its consumer with it.
            nodes[0].cut()
            assert await delivered(b"after node 0") == b"after node 0"
            assert port_of(connection) == nodes[1].port
            # Node 0 comes back, nodes 1 and 2 go: in turn, past the end of the list.
            nodes[0].restore()
            nodes[1].cut()
            nodes[2].cut()
            assert await delivered(b"after node 1") == b"after node 1"
            assert port_of(connection) == nodes[0].port
        finally:
            await connection.close()
            await channel.queue_delete(queue_name)


async def test_policies_are_set_through_the_first_management_api_that_answers(
    settings: Settings,
) -> None:
    api = urllib.parse.urlsplit(settings.amqp_management_url)
    down = f"127.0.0.1:{free_port()}"
    listed = settings.replace(amqp_management_url=f"http://{down},{api.netloc}/")
    applied = await policies.apply_configured(listed)
    assert [p.name for p in applied] == [p.name for p in policies.policies(settings.topology(), 3)]
    with pytest.raises(DependencyUnavailable):
        await policies.apply_configured(
            settings.replace(amqp_management_url=f"http://{down},127.0.0.1:{free_port()}/")
        )
