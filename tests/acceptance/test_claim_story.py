"""`flashclaim claim show`: the story of a granted, a refused, a pending and a
dead-lettered claim, told from what the servers hold."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from typing import Any

import aiohttp

from flashclaim.core.settings import Settings
from tests.acceptance.conftest import Services, service_env
from tests.conftest import create_coupon_row


def show(settings: Settings, request_id: str) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "flashclaim.cli", "claim", "show", request_id, "--json"],
        env=service_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


async def claim(http: aiohttp.ClientSession, services: Services, user: str, coupon: str) -> Any:
    async with http.post(
        f"{services.base_url}/api/coupons/claim", json={"user_id": user, "coupon_name": coupon}
    ) as r:
        return r.status, await r.json()


async def until_story(settings: Settings, request_id: str, *verdicts: str) -> dict[str, Any]:
    """The story once its verdict begins with one of these (each a real, non-empty one)."""
    assert verdicts and all(verdicts), verdicts
    async with asyncio.timeout(30):
        while True:
            _, story = await asyncio.to_thread(show, settings, request_id)
            if story["verdict"].startswith(verdicts):
                return story
            await asyncio.sleep(0.2)


async def test_the_story_of_a_granted_a_refused_a_pending_and_a_dead_lettered_claim(
    services: Services,
    settings: Settings,
    coupon_name: str,
    exploding_user: str,
    http: aiohttp.ClientSession,
) -> None:
    create_coupon_row(settings.database_url, coupon_name, 2)
    consumer = services.start_consumer(max_attempts=1)
    await services.start_gateway(claim_wait_seconds=1)

    status, granted = await claim(http, services, "alice", coupon_name)
    assert status == 200
    story = await until_story(settings, granted["request_id"], "granted")
    assert story["inbox"]["status"] == "PROCESSED" and story["inbox"]["outcome"] == "claimed"
    assert story["claim"]["user_id"] == "alice"
    assert story["redis"]["source"] == "consumer" and story["redis"]["outcome"] == "claimed"
    assert story["event"] is not None and story["dead_letter"] is None

    status, refused = await claim(http, services, "alice", coupon_name)
    assert status == 409
    story = await until_story(
        settings, refused["request_id"], "refused: already_claimed", "answered by the gateway"
    )
    assert story["verdict"].endswith("already_claimed"), story["verdict"]
    assert story["claim"] is None and story["event"] is None

    status, failed = await claim(http, services, exploding_user, coupon_name)
    # The consumer dead-letters it; the gateway, not told of failures, says "pending".
    assert status == 202 and failed["status"] == "pending", (status, failed)
    story = await until_story(settings, failed["request_id"], "dead-lettered")
    assert story["dead_letter"]["reason"] == "failed"
    assert "refusing claims" in story["dead_letter"]["error"]
    assert story["inbox"]["status"] == "FAILED" and story["claim"] is None

    consumer.send_signal(signal.SIGSTOP)
    try:
        status, pending = await claim(http, services, "bob", coupon_name)
        assert status == 202
        story = await until_story(settings, pending["request_id"], "accepted")
        assert story["inbox"] is None and story["claim"] is None
    finally:
        consumer.send_signal(signal.SIGCONT)
    await until_story(settings, pending["request_id"], "granted")

    code, story = await asyncio.to_thread(show, settings, str(uuid.uuid4()))
    assert code == 1 and story["verdict"].startswith("unknown")
    bad = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "flashclaim.cli", "claim", "show", "not-an-id"],
        env=service_env(settings),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "not a request id" in bad.stderr
