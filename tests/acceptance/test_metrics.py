"""Metrics scraped over HTTP from real processes, and a real Prometheus evaluating the
shipped alert rules and dashboard against them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from flashclaim.core.settings import Settings
from flashclaim.devtools.devstack import PROFILES, Stack
from flashclaim.devtools.prometheus import DASHBOARD, DEPLOY, RULES, Prometheus, Targets
from tests.acceptance.conftest import Samples, Services, free_port, scrape, total
from tests.conftest import create_coupon_row

STOCK = 10
CLAIMS = 40


def series(samples: Samples, name: str) -> list[frozenset[tuple[str, str]]]:
    return [ls for (n, ls) in samples if n == name]


async def claim_burst(
    http: aiohttp.ClientSession, base: str, coupon: str, n: int, prefix: str = "user"
) -> list[int]:
    async def one(i: int) -> int:
        # A connection each, so the kernel spreads them over the gateway's workers.
        async with (
            aiohttp.ClientSession() as own,
            own.post(
                f"{base}/api/coupons/claim",
                json={"user_id": f"{prefix}_{i}", "coupon_name": coupon},
            ) as r,
        ):
            await r.read()
            return r.status

    return await asyncio.gather(*(one(i) for i in range(n)))


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    """Poll ``predicate`` until it holds (a scrape is a read: there is nothing to wait on)."""
    async with asyncio.timeout(timeout):
        while True:
            if await predicate():
                return
            await asyncio.sleep(0.2)


@pytest.fixture
def services(own_settings: Settings) -> Iterator[Services]:
    """Services on a database of their own: a relay publishes every pending row of its
    database, and these tests count what it sent."""
    running = Services(own_settings)
    yield running
    running.stop()


async def test_each_process_serves_metrics_that_follow_the_claims(
    services: Services, coupon_name: str, http: aiohttp.ClientSession
) -> None:
    """Gateway (two workers, summed), consumer and relay: the counters and histograms
    move with the claims, and agree with the answers the clients got."""
    consumer_port, relay_port = free_port(), free_port()
    create_coupon_row(services.settings.database_url, coupon_name, STOCK)
    services.start_consumer(metrics_port=consumer_port)
    services.start_relay(metrics_port=relay_port)
    await services.start_gateway(gateway_workers=2)
    gateway = f"{services.base_url}/metrics"
    consumer = f"http://127.0.0.1:{consumer_port}/metrics"
    relay = f"http://127.0.0.1:{relay_port}/metrics"

    async def serving(url: str) -> bool:
        try:
            await scrape(http, url)
        except aiohttp.ClientError:
            return False
        return True

    await until(lambda: serving(consumer))
    await until(lambda: serving(relay))
    before = await scrape(http, gateway)
    assert total(before, "flashclaim_claims_total") == 0
    # Every outcome and path is a series from the start (a dashboard shows 0, not "no data").
    assert len(series(before, "flashclaim_claims_total")) == 5 * 3

    statuses = await claim_burst(http, services.base_url, coupon_name, CLAIMS)
    async with http.post(f"{services.base_url}/api/coupons/claim", data=b"{oops") as r:
        assert r.status == 400
    assert statuses.count(200) == STOCK

    route = "/api/coupons/claim"

    async def every_request_counted() -> bool:
        # Each worker hands its figures over once a second (metrics.Tally).
        page = await scrape(http, gateway)
        return total(page, "flashclaim_http_requests_total", route=route) == CLAIMS + 1

    await until(every_request_counted)
    after = await scrape(http, gateway)
    # Summed over both workers, whichever answered the scrape.
    assert total(after, "flashclaim_http_requests_total", route=route) == CLAIMS + 1
    assert total(after, "flashclaim_http_requests_total", route=route, status="200") == STOCK
    assert total(after, "flashclaim_http_request_duration_seconds_count", route=route) == CLAIMS + 1
    assert total(after, "flashclaim_http_errors_total", code="invalid_request") == 1
    assert total(after, "flashclaim_claims_total") == CLAIMS
    assert total(after, "flashclaim_claims_total", outcome="claimed") == STOCK
    assert total(after, "flashclaim_claims_total", outcome="claimed", path="round_trip") == STOCK
    assert total(after, "flashclaim_claims_total", outcome="out_of_stock") == CLAIMS - STOCK
    published = total(after, "flashclaim_publish_confirm_seconds_count")
    assert 1 <= published <= CLAIMS
    assert total(after, "flashclaim_publish_claims_sum") == total(
        after, "flashclaim_claims_total", path="round_trip"
    )
    assert total(after, "flashclaim_claim_result_wait_seconds_count") == total(
        after, "flashclaim_claims_total", path="round_trip"
    )
    assert total(after, "flashclaim_claims_in_flight") == 0
    # One breaker series per live worker: both workers report into the sum.
    await until(
        lambda: _breakers(http, gateway, 2),
    )

    async def consumer_counted() -> bool:
        c = await scrape(http, consumer)
        return total(c, "flashclaim_consumer_claims_total", outcome="claimed") == STOCK

    await until(consumer_counted)
    c = await scrape(http, consumer)
    applied = total(c, "flashclaim_consumer_claims_total")
    assert applied == total(after, "flashclaim_claims_total", path="round_trip")
    assert total(c, "flashclaim_consumer_batch_claims_sum") == applied
    assert total(c, "flashclaim_consumer_apply_seconds_count") >= 1
    assert total(c, "flashclaim_consumer_messages_total") == published
    assert total(c, "flashclaim_dead_letters_total") == 0
    assert total(c, "flashclaim_consumer_partitions", role="active") == 4

    async def relay_counted() -> bool:
        r = await scrape(http, relay)
        # coupon.created + one coupon.claimed per grant + coupon.sold_out
        return total(r, "flashclaim_outbox_published_total") == STOCK + 2

    await until(relay_counted)
    figures = await scrape(http, relay)
    assert total(figures, "flashclaim_outbox_event_lag_seconds_count") == STOCK + 2
    assert total(figures, "flashclaim_db_pool_connections") >= 1


async def _breakers(http: aiohttp.ClientSession, url: str, workers: int) -> bool:
    samples = await scrape(http, url)
    pids = {dict(ls).get("pid") for ls in series(samples, "flashclaim_broker_breaker_open")}
    return len(pids) == workers and total(samples, "flashclaim_broker_breaker_open") == 0


async def test_metrics_turned_off_count_nothing(
    services: Services, coupon_name: str, http: aiohttp.ClientSession
) -> None:
    create_coupon_row(services.settings.database_url, coupon_name, 1)
    services.start_consumer()
    await services.start_gateway(metrics_enabled=False)
    statuses = await claim_burst(http, services.base_url, coupon_name, 3)
    assert statuses.count(200) == 1
    async with http.get(f"{services.base_url}/metrics") as r:
        assert r.status == 200
        assert await r.text() == ""


# A real Prometheus: every target up, every rule and every dashboard expression evaluates.


@pytest.fixture
def prometheus(stack: Stack, services: Services) -> Iterator[tuple[Prometheus, Targets]]:
    if stack.rabbitmq is None:
        pytest.skip("RabbitMQ's Prometheus plugin is scraped on the suite's own broker")
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: `make deps` installs it")
    targets = Targets(
        gateway=[f"127.0.0.1:{services.port}"],
        consumer=[f"127.0.0.1:{free_port()}"],
        relay=[f"127.0.0.1:{free_port()}"],
        rabbitmq=[f"127.0.0.1:{PROFILES['test'].prometheus}"],
    )
    server = Prometheus(stack.root, PROFILES["test"].prometheus_server, targets, interval="1s")
    shutil.rmtree(stack.root / "prometheus-data", ignore_errors=True)
    server.start()
    yield server, targets
    server.stop()


def expressions() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(alert name, expr)`` of every rule and ``(panel title, expr)`` of every panel."""
    import yaml

    rules = [
        (rule["alert"], rule["expr"])
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    ]
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    return rules, panels


def test_promtool_passes_the_shipped_configuration_and_rules(
    prometheus: tuple[Prometheus, Targets], tmp_path: Path
) -> None:
    server, _ = prometheus
    compose = tmp_path / "prometheus.yml"
    compose.write_text(
        (DEPLOY / "prometheus" / "prometheus.yml")
        .read_text()
        .replace("/etc/prometheus/alerts.yml", str(RULES))
    )
    for args in (
        ["check", "config", str(server.config_path)],
        ["check", "config", str(compose)],
        ["check", "rules", str(RULES)],
        ["test", "rules", str(RULES.parent / "alerts_test.yml")],
    ):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True, check=False)
        assert done.returncode == 0, (args, done.stdout, done.stderr)


async def test_prometheus_scrapes_every_target_and_the_rules_and_dashboard_evaluate(
    prometheus: tuple[Prometheus, Targets],
    services: Services,
    coupon_name: str,
    http: aiohttp.ClientSession,
) -> None:
    server, targets = prometheus
    create_coupon_row(services.settings.database_url, coupon_name, STOCK)
    services.start_consumer(metrics_port=int(targets.consumer[0].rsplit(":", 1)[1]))
    services.start_relay(metrics_port=int(targets.relay[0].rsplit(":", 1)[1]))
    await services.start_gateway(gateway_workers=2)

    async def query(expr: str) -> list[object]:
        async with http.get(f"{server.url}/api/v1/query", params={"query": expr}) as r:
            body = await r.json()
        assert body["status"] == "success", (expr, body)
        return list(body["data"]["result"])

    async def all_up() -> bool:
        async with http.get(f"{server.url}/api/v1/targets") as r:
            active = (await r.json())["data"]["activeTargets"]
        return len(active) == 5 and all(t["health"] == "up" for t in active)

    await until(all_up, 30)
    # A short load, in two waves a few scrapes apart so that rates have points.
    for wave in range(2):
        await claim_burst(http, services.base_url, coupon_name, CLAIMS, prefix=f"w{wave}")
        async with http.post(f"{services.base_url}/api/coupons/claim", data=b"{") as r:
            assert r.status == 400
        await asyncio.sleep(3)

    rules, panels = expressions()

    async def panels_have_data() -> bool:
        return all([await query(expr) for _, expr in panels])

    with contextlib.suppress(TimeoutError):  # the assertion below names what is missing
        await until(panels_have_data, 30)
    empty = [title for title, expr in panels if not await query(expr)]
    assert not empty, empty
    for _, expr in rules:
        await query(expr)  # evaluates without error
    # The rules are loaded and evaluated by the server itself, without error.
    async with http.get(f"{server.url}/api/v1/rules") as r:
        groups = (await r.json())["data"]["groups"]
    loaded = {rule["name"]: rule for g in groups for rule in g["rules"]}
    assert set(loaded) == {name for name, _ in rules}
    assert all(rule["health"] == "ok" for rule in loaded.values()), loaded
    # Nothing is wrong with this stack: no alert fires.
    assert [r["name"] for r in loaded.values() if r["state"] == "firing"] == []
