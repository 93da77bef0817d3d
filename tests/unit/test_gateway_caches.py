"""The gateway's read sharing and final-answer cache, without I/O."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from flashclaim.core.messages import ClaimCommand, ClaimResult, Outcome
from gateway.gateway_answers import GatewayAnswers
from gateway.nextflight import NextFlight


async def test_concurrent_reads_share_one_query() -> None:
    calls = 0
    release = asyncio.Event()

    async def fetch(key: str) -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return calls

    flight: NextFlight[str, int] = NextFlight(fetch)
    readers = [asyncio.create_task(flight.get("k")) for _ in range(50)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*readers) == [1] * 50
    assert calls == 1


async def test_a_read_never_joins_a_query_that_started_before_it() -> None:
    value = 0
    started = asyncio.Event()
    release = asyncio.Event()

    async def fetch(key: str) -> int:
        seen = value
        started.set()
        await release.wait()
        return seen

    flight: NextFlight[str, int] = NextFlight(fetch)
    early = asyncio.create_task(flight.get("k"))
    await started.wait()
    value = 1  # a write acknowledged while the first query runs
    late = [asyncio.create_task(flight.get("k")) for _ in range(10)]
    await asyncio.sleep(0)
    release.set()
    assert await early == 0
    assert await asyncio.gather(*late) == [1] * 10  # one new query, after the write


async def test_a_failed_query_fails_every_waiter() -> None:
    async def fetch(key: str) -> int:
        await asyncio.sleep(0)
        raise ConnectionError("down")

    flight: NextFlight[str, int] = NextFlight(fetch)
    results = await asyncio.gather(*(flight.get("k") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


def claim(user: str, coupon: str = "C") -> ClaimCommand:
    return ClaimCommand(uuid.uuid4(), user, coupon)


async def test_final_answers_come_from_grants_and_sold_out_coupons() -> None:
    async def holders(coupon: str) -> list[str]:
        return ["alice", "bob"]

    known = GatewayAnswers(holders)
    assert known.answer(claim("alice")) is None
    known.learn(ClaimResult.of(claim("alice"), Outcome.CLAIMED))
    assert known.answer(claim("alice")) is Outcome.ALREADY_CLAIMED
    assert known.answer(claim("carol")) is None  # stock unknown: ask the consumer
    known.learn(ClaimResult.of(claim("carol"), Outcome.OUT_OF_STOCK))
    await asyncio.sleep(0.01)
    assert known.answer(claim("bob")) is Outcome.ALREADY_CLAIMED
    assert known.answer(claim("dave")) is Outcome.OUT_OF_STOCK
    assert known.answer(claim("dave", "OTHER")) is None


async def test_sold_out_is_not_assumed_when_holders_cannot_be_read() -> None:
    async def holders(coupon: str) -> list[str]:
        raise ConnectionError("database down")

    known = GatewayAnswers(holders)
    known.learn(ClaimResult.of(claim("carol"), Outcome.OUT_OF_STOCK))
    await asyncio.sleep(0.01)
    assert known.answer(claim("dave")) is None


@pytest.mark.parametrize("outcome", [Outcome.NO_SUCH_COUPON, Outcome.ALREADY_CLAIMED])
def test_other_answers_teach_nothing(outcome: Outcome) -> None:
    async def holders(coupon: str) -> list[str]:
        raise AssertionError("not called")

    known = GatewayAnswers(holders)
    known.learn(ClaimResult.of(claim("alice"), outcome))
    assert known.answer(claim("alice")) is None


async def test_final_answers_stay_within_their_memory_bound() -> None:
    async def holders(coupon: str) -> list[str]:
        return [f"{coupon}-u{i}" for i in range(30)]

    known = GatewayAnswers(holders, max_entries=100)
    for c in range(20):
        for u in range(10):
            known.learn(ClaimResult.of(claim(f"u{u}", f"C{c}"), Outcome.CLAIMED))
        assert known._size <= 100
    assert known.answer(claim("u1", "C19")) is Outcome.ALREADY_CLAIMED  # recent: kept
    assert known.answer(claim("u1", "C0")) is None  # oldest: forgotten, asks the consumer
    for c in range(5):
        known.learn(ClaimResult.of(claim("x", f"S{c}"), Outcome.OUT_OF_STOCK))
        await asyncio.sleep(0.01)
        assert known._size <= 100
    assert known.answer(claim("nobody", "S4")) is Outcome.OUT_OF_STOCK

    async def crowd(coupon: str) -> list[str]:
        return [f"u{i}" for i in range(60)]  # more than half the bound: not kept

    known = GatewayAnswers(crowd, max_entries=100)
    known.learn(ClaimResult.of(claim("x", "BIG"), Outcome.OUT_OF_STOCK))
    await asyncio.sleep(0.01)
    assert known.answer(claim("nobody", "BIG")) is None
    assert known._size == 0
