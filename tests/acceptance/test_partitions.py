"""Partitioned command queues: each coupon in one queue, each queue one active consumer,
consumers sharing the partitions and taking over each other's."""

from __future__ import annotations

import asyncio
import base64
import signal
import urllib.parse

import aiohttp
import pytest

from flashclaim.core.settings import Settings
from flashclaim.devtools import scenarios
from flashclaim.devtools.devstack import Stack
from tests.acceptance.conftest import Services


@pytest.fixture
def management(stack: Stack) -> str:
    if stack.rabbitmq is None:
        pytest.skip("needs the suite's own RabbitMQ (management API)")
    return stack.rabbitmq.management_url.rstrip("/")


async def active_consumers(management: str, settings: Settings) -> dict[str, str]:
    """Partition queue -> connection name of its single active consumer."""
    active = {}
    auth = {"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()}
    async with aiohttp.ClientSession(headers=auth) as http:
        async with http.get(f"{management}/api/connections") as r:
            clients = {
                c["name"]: c.get("client_properties", {}).get("connection_name")
                for c in await r.json()
            }
        for name in settings.topology().claims_queues:
            url = f"{management}/api/queues/%2F/{urllib.parse.quote(name, safe='')}"
            async with http.get(url) as r:
                queue = await r.json()
            for consumer in queue.get("consumer_details", []):
                # The management database lists a consumer whose channel it no longer
                # knows (a killed consumer's, for a moment) with channel_details [].
                channel = consumer.get("channel_details")
                if consumer.get("activity_status") == "single_active" and channel:
                    connection = channel["connection_name"]
                    active[name] = clients.get(connection, connection)
    return active


async def wait_for(management: str, settings: Settings, expected: dict[str, str]) -> None:
    for _ in range(150):
        if await active_consumers(management, settings) == expected:
            return
        await asyncio.sleep(0.2)
    assert await active_consumers(management, settings) == expected


async def test_consumers_share_partitions_and_take_over(
    services: Services, http: aiohttp.ClientSession, settings: Settings, management: str
) -> None:
    sharing = {"consumer_count": 2, "standby_delay_seconds": 0.5}
    first = services.start_consumer(consumer_index=0, instance_id="c0", **sharing)
    services.start_consumer(consumer_index=1, instance_id="c1", **sharing)
    await services.start_gateway()
    queues = settings.topology().claims_queues  # 4 partitions
    await wait_for(management, settings, {q: f"consumer c{p % 2}" for p, q in enumerate(queues)})

    # Claims on many coupons spread over both consumers; every invariant holds.
    reports = await asyncio.gather(
        *(scenarios.flash_sale(http, services.base_url, users=40, stock=7) for _ in range(8))
    )
    assert all(r.violations == [] for r in reports)

    # The first consumer goes away: its stand-by takes its partitions over.
    first.send_signal(signal.SIGKILL)
    first.wait()
    await wait_for(management, settings, {q: "consumer c1" for q in queues})
    report = await scenarios.flash_sale(http, services.base_url, users=40, stock=7)
    assert report.violations == []
