"""Queue limits and dead-lettering are policies, so they can change on live queues."""

from __future__ import annotations

import asyncio
import urllib.parse

import aiohttp

from consumer import service
from flashclaim.core.policies import policies
from flashclaim.core.settings import Settings


async def effective(settings: Settings, queue: str) -> dict[str, object]:
    api = urllib.parse.urlsplit(settings.amqp_management_url)
    url = f"http://{api.hostname}:{api.port}/api/queues/%2F/{urllib.parse.quote(queue, safe='')}"
    async with (
        aiohttp.ClientSession(headers={"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="}) as http,
        http.get(url) as response,
    ):
        assert response.status == 200, await response.text()
        data = await response.json()
    return dict(data.get("effective_policy_definition") or {})


async def eventually(settings: Settings, queue: str, key: str, value: object) -> dict[str, object]:
    """The management API refreshes a queue's view every few seconds: poll."""
    for _ in range(100):
        definition = await effective(settings, queue)
        if definition.get(key) == value:
            return definition
        await asyncio.sleep(0.2)
    raise AssertionError(f"{queue}: {key} is not {value!r} but {definition.get(key)!r}")


async def run_consumer_briefly(settings: Settings) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(settings, stop))
    await asyncio.sleep(2.0)
    assert not task.done(), task.exception() if task.done() else None
    stop.set()
    await task


async def test_a_new_delivery_limit_applies_to_existing_queues(settings: Settings) -> None:
    """Queue arguments cannot change: a consumer started with another delivery limit
    used to fail every declaration with PRECONDITION_FAILED."""
    topology = settings.topology()
    await run_consumer_briefly(settings.replace(delivery_limit=5))
    await eventually(settings, topology.claims_queue(0), "delivery-limit", 5)
    await run_consumer_briefly(settings.replace(delivery_limit=7))
    partition = await eventually(settings, topology.claims_queue(0), "delivery-limit", 7)
    assert partition == {
        "delivery-limit": 7,
        "dead-letter-exchange": topology.dead_letter_exchange,
        "dead-letter-strategy": "at-least-once",
        "overflow": "reject-publish",
        "max-length-bytes": settings.command_queue_max_bytes,
    }
    await eventually(settings, topology.claims_dlq, "overflow", "reject-publish")


def test_the_dlq_has_no_delivery_limit_on_rabbitmq_4(settings: Settings) -> None:
    """RabbitMQ 4 gives quorum queues a default limit of 20 deliveries; every peek at the
    DLQ is one. There the DLQ's policy lifts it (-1); 3.x has no default and refuses -1."""
    topology = settings.topology()
    on_4 = {p.name: p.definition for p in policies(topology, 4)}
    on_3 = {p.name: p.definition for p in policies(topology, 3)}
    assert on_4[topology.claims_dlq]["delivery-limit"] == -1
    assert "delivery-limit" not in on_3[topology.claims_dlq]
    assert on_4[f"{topology.namespace}.claims"]["delivery-limit"] == settings.delivery_limit
