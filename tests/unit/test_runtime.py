"""The service runtime (flashclaim/core/runtime.py): what is opened is closed, in reverse,
bounded; a stop ends every wait; the work in hand gets its grace period."""

from __future__ import annotations

import asyncio
import time

import pytest

from flashclaim.core import runtime
from flashclaim.core.runtime import Runtime
from flashclaim.core.settings import Settings


@pytest.fixture
def settings() -> Settings:
    return Settings.checked({})


async def test_what_is_opened_is_closed_in_reverse_even_when_a_close_fails_or_hangs(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "CLOSE_SECONDS", 0.1)
    closed: list[str] = []

    async def hangs() -> None:
        closed.append("hangs")
        await asyncio.sleep(60)

    def fails() -> None:
        closed.append("fails")
        raise ConnectionError("the server is away")

    started = time.monotonic()
    async with Runtime(settings, "test", asyncio.Event()) as rt:
        rt.on_exit(lambda: closed.append("first"), "first")
        rt.on_exit(hangs, "hangs", seconds=0.1)
        rt.on_exit(fails, "fails")
        background = rt.background(asyncio.sleep(60), "sleeper")
    assert closed == ["fails", "hangs", "first"]
    assert background.cancelled()
    assert time.monotonic() - started < 5


async def test_a_stop_ends_a_start_up_that_waits_and_the_process_simply_ends(
    settings: Settings,
) -> None:
    stop = asyncio.Event()
    reached = []
    asyncio.get_running_loop().call_later(0.05, stop.set)
    async with Runtime(settings, "test", stop) as rt:
        await rt.until_stopped(asyncio.sleep(60))  # a server that never answers
        reached.append("after")  # pragma: no cover - the stop ends the block
    assert reached == []


async def test_a_pause_is_cut_short_by_a_stop(settings: Settings) -> None:
    stop = asyncio.Event()
    async with Runtime(settings, "test", stop) as rt:
        assert await rt.pause(0.01) is False
        asyncio.get_running_loop().call_later(0.05, stop.set)
        started = time.monotonic()
        assert await rt.pause(60) is True
        assert time.monotonic() - started < 5


async def test_work_gets_its_grace_period_then_is_cancelled_and_its_error_is_raised(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "SETTLE_SECONDS", 0.0)
    stop = asyncio.Event()
    finished: list[str] = []

    async def finishes_in_time() -> None:
        await stop.wait()
        await asyncio.sleep(0.05)
        finished.append("in time")

    async def never_finishes() -> None:
        await asyncio.sleep(60)

    async with Runtime(settings, "test", stop) as rt:
        stop.set()
        await rt.serve(finishes_in_time(), grace=1.0)
        started = time.monotonic()
        await rt.serve(never_finishes(), grace=0.1)  # cancelled, not waited for
        assert time.monotonic() - started < 5

    async def fails() -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        async with Runtime(settings, "test", asyncio.Event()) as rt:
            await rt.serve(fails(), grace=1.0)
    assert finished == ["in time"]
