"""The contract's concurrency scenarios, over HTTP, against real processes."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp

from flashclaim.devtools import scenarios
from tests.acceptance.conftest import LOGS, Services


async def test_flash_sale(api: Services, http: aiohttp.ClientSession) -> None:
    report = await scenarios.flash_sale(http, api.base_url, users=50, stock=5)
    assert report.violations == []
    assert dict(report.statuses) == {200: 5, 400: 45}
    assert report.retried == 0 and set(report.seen) <= {200, 202, 400}, report.seen
    assert report.coupon_state["remaining_amount"] == 0
    assert sorted(report.coupon_state["claimed_by"]) == sorted(report.winners)
    assert len(report.winners) == 5


async def test_double_dip(api: Services, http: aiohttp.ClientSession) -> None:
    report = await scenarios.double_dip(http, api.base_url, attempts=10, stock=100)
    assert report.violations == []
    assert dict(report.statuses) == {200: 1, 409: 9}
    assert report.retried == 0 and set(report.seen) <= {200, 202, 409}, report.seen
    assert report.coupon_state["remaining_amount"] == 99
    assert report.coupon_state["claimed_by"] == ["user_12345"]


async def test_burst_of_2000_claims_for_100_in_stock(
    api: Services, http: aiohttp.ClientSession
) -> None:
    report = await scenarios.flash_sale(http, api.base_url, users=2000, stock=100)
    assert report.violations == []
    assert report.statuses[200] == 100
    assert report.statuses[400] == 1900
    # No fault was injected: no retry, and nothing but final answers and 202s on the way.
    assert report.retried == 0 and set(report.seen) <= {200, 202, 400}, report.seen
    assert report.coupon_state["remaining_amount"] == 0
    assert len(set(report.coupon_state["claimed_by"])) == 100


async def test_two_consumers_split_the_partitions_without_overselling(
    services: Services, http: aiohttp.ClientSession
) -> None:
    """Consumer 0 of 2 and consumer 1 of 2 each apply their own partitions (and stand by
    for the other's): ten concurrent sales spread over both, and none oversells."""
    ids = [f"consumer-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for index, instance in enumerate(ids):
        services.start_consumer(consumer_count=2, consumer_index=index, instance_id=instance)
    await services.start_gateway()
    reports = await asyncio.gather(
        *(scenarios.flash_sale(http, services.base_url, users=60, stock=7) for _ in range(10))
    )
    for report in reports:
        assert report.violations == []
        assert (report.statuses[200], report.statuses[400]) == (7, 53)
        assert report.retried == 0 and set(report.seen) <= {200, 202, 400}, report.seen
    # Both consumers applied claims (ten coupons all hashing to one consumer's two
    # partitions has a chance of 1 in 512).
    for instance in ids:
        log = (LOGS / f"{services.settings.namespace}-{instance}.log").read_text()
        applied = [
            json.loads(line).get("applied", 0) for line in log.splitlines() if "batch done" in line
        ]
        assert sum(applied) > 0, instance
