"""The contract's concurrency scenarios, over HTTP, against real processes."""

from __future__ import annotations

import aiohttp

from flashclaim import scenarios
from tests.acceptance.conftest import Services


async def test_flash_sale(api: Services, http: aiohttp.ClientSession) -> None:
    report = await scenarios.flash_sale(http, api.base_url, users=50, stock=5)
    assert report.violations == []
    assert dict(report.statuses) == {200: 5, 400: 45}
    assert report.coupon_state["remaining_amount"] == 0
    assert sorted(report.coupon_state["claimed_by"]) == sorted(report.winners)
    assert len(report.winners) == 5


async def test_double_dip(api: Services, http: aiohttp.ClientSession) -> None:
    report = await scenarios.double_dip(http, api.base_url, attempts=10, stock=100)
    assert report.violations == []
    assert dict(report.statuses) == {200: 1, 409: 9}
    assert report.coupon_state["remaining_amount"] == 99
    assert report.coupon_state["claimed_by"] == ["user_12345"]


async def test_burst_of_2000_claims_for_100_in_stock(
    api: Services, http: aiohttp.ClientSession
) -> None:
    report = await scenarios.flash_sale(http, api.base_url, users=2000, stock=100)
    assert report.violations == []
    assert report.statuses[200] == 100
    assert report.statuses[400] == 1900
    assert not any(status >= 500 for status in report.statuses)
    assert report.coupon_state["remaining_amount"] == 0
    assert len(set(report.coupon_state["claimed_by"])) == 100


async def test_two_consumers_share_the_load_without_overselling(
    services: Services, http: aiohttp.ClientSession
) -> None:
    services.start_consumer()
    services.start_consumer()
    await services.start_gateway()
    report = await scenarios.flash_sale(http, services.base_url, users=400, stock=37)
    assert report.violations == []
    assert (report.statuses[200], report.statuses[400]) == (37, 363)
