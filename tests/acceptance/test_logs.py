"""Every line the services write parses as JSON with the log schema."""

from __future__ import annotations

import json

import aiohttp

from flashclaim.core.logs import CONTEXT, REQUIRED
from flashclaim.core.settings import Settings
from tests.acceptance.conftest import LOGS, Services
from tests.conftest import create_coupon_row

LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


async def test_every_line_of_every_service_parses_with_the_schema(
    services: Services, settings: Settings, coupon_name: str, http: aiohttp.ClientSession
) -> None:
    """Gateway (its workers and gunicorn's own lines), consumer and relay, at INFO,
    through claims granted and refused, bad input, an unknown coupon, and a stop."""
    create_coupon_row(settings.database_url, coupon_name, 1)
    services.start_consumer()
    services.start_relay()
    await services.start_gateway(gateway_workers=2)
    base = services.base_url
    for user in ("alice", "bob", "alice"):
        async with http.post(
            f"{base}/api/coupons/claim", json={"user_id": user, "coupon_name": coupon_name}
        ) as r:
            assert r.status in (200, 400, 409)
    async with http.post(f"{base}/api/coupons/claim", data=b"{not json") as r:
        assert r.status == 400
    async with http.get(f"{base}/api/coupons/NOPE_{coupon_name}") as r:
        assert r.status == 404
    services.stop()
    lines = [
        (path.name, raw)
        for path in LOGS.glob(f"{settings.namespace}-*.log")
        for raw in path.read_text().splitlines()
    ]
    services_seen = set()
    requests = []
    for name, raw in lines:
        entry = json.loads(raw)  # every line is JSON
        assert set(REQUIRED) <= set(entry), (name, raw)
        assert entry["level"] in LEVELS, raw
        assert not {"message", "ts", "coupon_name"} & set(entry), raw
        services_seen.add(entry["service"])
        if entry["event"] == "request":
            requests.append(entry)
    assert services_seen == {"gateway", "consumer", "relay"}
    claims = [r for r in requests if r["path"] == "/api/coupons/claim"]
    assert len(claims) == 4 and all(r["http_request_id"] for r in requests)
    assert {r.get("outcome") for r in claims if r["status"] != 400 or "coupon" in r} >= {"claimed"}
    assert all(r["coupon"] == coupon_name for r in claims if "coupon" in r)
    assert all(
        set(r) - set(REQUIRED) - set(CONTEXT) <= {"method", "path", "status"} for r in requests
    )
