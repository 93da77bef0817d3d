"""The liveness a consumer or a relay serves (``/healthz`` on its metrics port) sees its
event loop stall, though a thread answers it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
import urllib.error
import urllib.request

from flashclaim import healthcheck
from flashclaim.core import metrics
from flashclaim.core.settings import Settings
from tests.acceptance.conftest import free_port


def _read(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=2) as response:
        return bytes(response.read())


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def _get_after(seconds: float, url: str) -> tuple[int, dict[str, object]]:
    time.sleep(seconds)
    return _get(url)


async def test_healthz_answers_503_while_the_event_loop_is_blocked() -> None:
    port = free_port()
    endpoint = metrics.Endpoint(metrics.ConsumerMetrics(True), "127.0.0.1", port, stall_after=0.5)
    settings = Settings().replace(metrics_port=port)
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        await asyncio.sleep(0.1)  # the first beat
        status, body = await asyncio.to_thread(_get, url)
        assert (status, body["status"]) == (200, "ok"), body
        assert await asyncio.to_thread(healthcheck.check, "consumer", settings)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # Asked from another thread while the loop is held by a synchronous call.
            during = pool.submit(_get_after, 1.0, url)
            check = pool.submit(healthcheck.check, "consumer", settings)
            time.sleep(1.6)  # noqa: ASYNC251 - the stall under test: no beat
            status, body = during.result()
            assert status == 503 and body["status"] == "stalled", body
            assert float(body["loop_silent_seconds"]) >= 0.5  # type: ignore[arg-type]
            assert check.result() is False

        await asyncio.sleep(0.1)  # the loop runs again: it beats at once
        status, body = await asyncio.to_thread(_get, url)
        assert status == 200, body
        # /metrics is still the registry's text format.
        text = await asyncio.to_thread(_read, f"http://127.0.0.1:{port}/metrics")
        assert b"flashclaim_build_info" in text
    finally:
        endpoint.close()


def test_nothing_is_served_on_port_0() -> None:
    async def run() -> None:
        endpoint = metrics.Endpoint(metrics.RelayMetrics(True), "127.0.0.1", 0)
        endpoint.close()

    asyncio.run(run())
    assert healthcheck.check("relay", Settings().replace(metrics_port=0))
