"""The harness's claim client (flashclaim/devtools/client.py) against a server that
misbehaves on purpose: every status it is given is recorded, whatever the body, and a
missing answer is told apart from a wrong one. (The oracle of the scenarios, the load
tests and the fault tests: it must see what a gateway gets wrong.)"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from flashclaim.devtools import promises
from flashclaim.devtools.client import ClaimClient
from tests.acceptance.conftest import free_port

Answers = list[Callable[[], web.Response]]
NOW = {"Retry-After": "0"}  # retried at once


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[str, Answers]]:
    """A stand-in gateway: each claim gets the next answer of the list it yields."""
    answers: Answers = []
    calls = itertools.count()

    async def claim(request: web.Request) -> web.Response:
        return answers[min(next(calls), len(answers) - 1)]()

    async def coupon(request: web.Request) -> web.Response:
        return web.json_response(
            {"name": "C", "amount": 1, "remaining_amount": 0, "claimed_by": ["u"]}
        )

    app = web.Application()
    app.router.add_post("/api/coupons/claim", claim)
    app.router.add_get("/api/coupons/{name}", coupon)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", answers
    await runner.cleanup()


def claimed() -> web.Response:
    return web.json_response({"status": "claimed", "user_id": "u", "coupon_name": "C"})


async def test_a_server_error_with_a_page_for_a_body_is_seen(
    gateway: tuple[str, Answers],
) -> None:
    base, answers = gateway
    answers += [
        lambda: web.Response(status=500, text="<html>Error</html>", headers=NOW),
        lambda: web.Response(status=502, body=b"\xff\xfe not even text", headers=NOW),
        lambda: web.json_response([1, 2], status=503, headers=NOW),
        claimed,
    ]
    async with aiohttp.ClientSession() as http:
        answer = await ClaimClient(http, base, deadline=20, poll_interval=0.01).claim("u", "C")
        assert (answer.status, answer.seen) == (200, [500, 502, 503, 200])
        assert answer.connection_errors == 0
        # ... and the promises every run keeps call it what it is: the claim was won,
        # and a server error was met on the way (the 503 alone would be no failure).
        verdict = await promises.check(
            http, base, [promises.Final("u", "C", answer.status)], ["C"], seen=answer.seen
        )
    assert not verdict.checks["no server error"]
    assert {k for k, held in verdict.checks.items() if not held} == {"no server error"}


async def test_no_answer_at_all_is_a_connection_error_not_a_status() -> None:
    async with aiohttp.ClientSession() as http:
        client = ClaimClient(http, f"http://127.0.0.1:{free_port()}", deadline=0.5)
        answer = await client.claim("u", "C")
    assert answer.status == 0 and answer.seen == [] and answer.connection_errors >= 1


async def test_a_202_without_location_is_its_final_answer(gateway: tuple[str, Answers]) -> None:
    base, answers = gateway
    answers.append(lambda: web.json_response({"status": "pending"}, status=202))
    async with aiohttp.ClientSession() as http:
        answer = await ClaimClient(http, base, deadline=5).claim("u", "C")
    assert (answer.status, answer.seen) == (202, [202])
