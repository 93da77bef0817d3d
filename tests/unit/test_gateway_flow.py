"""Coalescing claims into messages, and holding back claims that cannot win, without I/O."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest

from flashclaim.core.errors import DependencyUnavailable
from flashclaim.core.messages import (
    ClaimCommand,
    ClaimResult,
    Outcome,
    decode_claims,
    encode_claims,
)
from gateway.admission import Admission
from gateway.coalescer import Coalescer
from gateway.gateway_answers import GatewayAnswerWriter


def claim(coupon: str = "C", user: str | None = None) -> ClaimCommand:
    return ClaimCommand(uuid.uuid4(), user or uuid.uuid4().hex[:8], coupon, "replies:gw")


class Broker:
    """Records each message published; ``fail`` makes the next publishes raise."""

    def __init__(self) -> None:
        self.messages: list[list[ClaimCommand]] = []
        self.fail = False
        self.gate = asyncio.Event()
        self.gate.set()

    async def publish(self, commands: Sequence[ClaimCommand]) -> None:
        await self.gate.wait()
        if self.fail:
            raise DependencyUnavailable("broker", "down")
        self.messages.append(list(commands))


async def test_claims_of_one_coupon_arriving_together_share_one_message() -> None:
    broker = Broker()
    coalescer = Coalescer(broker.publish, linger=0.005, max_claims=100)
    hot = [claim("HOT") for _ in range(30)]
    other = [claim("OTHER") for _ in range(3)]
    await asyncio.gather(*(coalescer.publish(c) for c in [*hot, *other]))
    assert sorted(len(m) for m in broker.messages) == [3, 30]
    for message in broker.messages:
        assert len({c.coupon_name for c in message}) == 1  # one routing key per message


async def test_a_full_message_goes_at_once_and_the_rest_follow() -> None:
    broker = Broker()
    coalescer = Coalescer(broker.publish, linger=60.0, max_claims=10)
    full = [claim() for _ in range(10)]
    await asyncio.wait_for(asyncio.gather(*(coalescer.publish(c) for c in full)), 1.0)
    assert [len(m) for m in broker.messages] == [10]  # did not wait out the linger


async def test_every_claim_of_a_message_learns_its_publish_failed() -> None:
    broker = Broker()
    broker.fail = True
    coalescer = Coalescer(broker.publish, linger=0.0, max_claims=100)
    outcomes = await asyncio.gather(
        *(coalescer.publish(claim()) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(o, DependencyUnavailable) for o in outcomes)


async def test_a_request_that_goes_away_does_not_cancel_the_others_publish() -> None:
    broker = Broker()
    broker.gate.clear()
    coalescer = Coalescer(broker.publish, linger=0.0, max_claims=100)
    commands = [claim() for _ in range(3)]
    tasks = [asyncio.create_task(coalescer.publish(c)) for c in commands]
    await asyncio.sleep(0.01)
    tasks[0].cancel()
    broker.gate.set()
    await asyncio.gather(*tasks[1:])
    assert [len(m) for m in broker.messages] == [3]


async def test_coalesced_claims_round_trip_through_the_message_format() -> None:
    broker = Broker()
    coalescer = Coalescer(broker.publish, linger=0.001, max_claims=100)
    commands = [claim("C") for _ in range(4)]
    await asyncio.gather(*(coalescer.publish(c) for c in commands))
    message_id, body = encode_claims(broker.messages[0])
    assert message_id not in {str(c.request_id) for c in commands}
    assert decode_claims(message_id, body, "replies:gw").commands == commands


def result(command: ClaimCommand, outcome: Outcome, remaining: int | None) -> ClaimResult:
    return ClaimResult.of(command, outcome, remaining)


async def stock(value: int | None) -> int | None:
    return value


def in_flight(admission: Admission, coupon: str) -> int:
    """Claims of ``coupon`` let through and not answered yet (internal state, read to
    check the accounting directly)."""
    state = admission._coupons.get(coupon)
    return state.in_flight if state is not None else 0


async def test_claims_beyond_the_stock_are_held_and_released_as_claims_lose() -> None:
    admission = Admission(lambda coupon: stock(2), hold_seconds=5.0)
    first = [claim() for _ in range(2)]
    assert [await admission.enter("C") for _ in first] == [True, True]
    held = asyncio.create_task(admission.enter("C"))
    await asyncio.sleep(0.01)
    assert not held.done() and admission.holding() == 1
    # A claim in flight lost (the user already held it): its place goes to the held one.
    admission.leave("C", result(first[0], Outcome.ALREADY_CLAIMED, 2))
    assert await asyncio.wait_for(held, 1.0) is True
    assert in_flight(admission, "C") == 2


async def test_a_grant_does_not_release_a_held_claim_while_in_flight_covers_the_stock() -> None:
    admission = Admission(lambda coupon: stock(2), hold_seconds=5.0)
    first = [claim() for _ in range(2)]
    for _ in first:
        await admission.enter("C")
    held = asyncio.create_task(admission.enter("C"))
    await asyncio.sleep(0.01)
    admission.leave("C", result(first[0], Outcome.CLAIMED, 1))  # 1 left, 1 in flight
    await asyncio.sleep(0.01)
    assert not held.done()
    admission.leave("C", result(first[1], Outcome.CLAIMED, 0))  # sold out: still held
    await asyncio.sleep(0.01)
    assert not held.done()
    admission.sold_out("C")  # the final answers know every answer now
    assert await asyncio.wait_for(held, 1.0) is False
    assert in_flight(admission, "C") == 0


async def test_a_held_claim_is_published_when_the_hold_runs_out() -> None:
    admission = Admission(lambda coupon: stock(1), hold_seconds=0.05)
    assert await admission.enter("C") is True
    # No result ever comes back (replies lost): the held claim goes after the hold.
    assert await asyncio.wait_for(admission.enter("C"), 1.0) is True
    assert in_flight(admission, "C") == 2


async def test_unknown_stock_holds_nothing() -> None:
    admission = Admission(lambda coupon: stock(None), hold_seconds=5.0)  # no such coupon
    assert all([await admission.enter("C") for _ in range(50)])


async def test_a_stock_that_cannot_be_read_holds_nothing() -> None:
    async def down(coupon: str) -> int | None:
        raise ConnectionError("database away")

    admission = Admission(down, hold_seconds=5.0)
    assert all([await admission.enter("C") for _ in range(20)])


async def test_the_smallest_stock_seen_is_kept() -> None:
    admission = Admission(lambda coupon: stock(10), hold_seconds=5.0)
    first = claim()
    await admission.enter("C")
    admission.leave("C", result(first, Outcome.CLAIMED, 1))  # another gateway took 8
    admission.leave("C", result(first, Outcome.CLAIMED, 5))  # an older figure, late
    assert await admission.enter("C") is True
    held = asyncio.create_task(admission.enter("C"))
    await asyncio.sleep(0.01)
    assert not held.done()
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held


@pytest.mark.parametrize("released_first", [False, True])
async def test_a_held_request_that_goes_away_takes_no_place(released_first: bool) -> None:
    """Whether the request goes before or after its place was given to it."""
    admission = Admission(lambda coupon: stock(1), hold_seconds=5.0)
    first = claim()
    await admission.enter("C")
    gone = asyncio.create_task(admission.enter("C"))
    waiting = asyncio.create_task(admission.enter("C"))
    await asyncio.sleep(0.01)
    gone.cancel()
    if not released_first:
        await asyncio.sleep(0.01)
    admission.leave("C", result(first, Outcome.ALREADY_CLAIMED, 1))
    assert await asyncio.wait_for(waiting, 1.0) is True
    assert in_flight(admission, "C") == 1


async def test_idle_coupons_are_forgotten_beyond_the_bound() -> None:
    admission = Admission(lambda coupon: stock(5), hold_seconds=5.0, max_coupons=3)
    for i in range(10):
        assert await admission.enter(f"C{i}") is True
        admission.leave(f"C{i}", None)
    assert len(admission._coupons) <= 3


async def test_answers_given_by_the_gateway_are_written_many_to_a_command() -> None:
    writes: list[list[ClaimResult]] = []

    async def store(batch: Sequence[ClaimResult]) -> None:
        writes.append(list(batch))

    writer = GatewayAnswerWriter(store, linger=0.01, max_batch=4)
    answers = [ClaimResult.of(claim(), Outcome.OUT_OF_STOCK) for _ in range(6)]
    for answer in answers:
        writer.add(answer)
    await asyncio.sleep(0)
    assert [len(w) for w in writes] == [4]  # a full batch goes at once
    await asyncio.sleep(0.05)
    assert [len(w) for w in writes] == [4, 2]  # the rest after the linger
    assert [a for w in writes for a in w] == answers


async def test_a_failed_write_of_given_answers_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def store(batch: Sequence[ClaimResult]) -> None:
        raise DependencyUnavailable("redis", "ConnectionError('redis away')")

    writer = GatewayAnswerWriter(store, linger=0.001)
    writer.add(ClaimResult.of(claim(), Outcome.OUT_OF_STOCK))
    await writer.drain()
    assert "not kept in redis" in caplog.text


async def test_a_stock_read_as_zero_tells_the_final_answers_at_once() -> None:
    """Another process's claims took it all: no result of this one's will say so."""
    told: list[str] = []
    admission = Admission(lambda coupon: stock(0), hold_seconds=5.0)
    admission.on_exhausted = told.append
    held = asyncio.create_task(admission.enter("C"))
    await asyncio.sleep(0.01)
    assert told == ["C"] and not held.done()
    admission.sold_out("C")  # what the final answers call once they hold the answers
    assert await asyncio.wait_for(held, 1.0) is False


@pytest.mark.parametrize(
    ("waiting_for", "bound"),
    # Its turn: a task, its frame, a future and a place in the expiries (a timer of
    # its own: 1,180 to 1,270 bytes in all); the stock read: a task, its frame, a future.
    [("its turn", 1150), ("the stock read", 1400)],
)
async def test_a_held_claim_costs_little_memory(waiting_for: str, bound: int) -> None:
    """In a sell-out nearly every claim of a burst waits in the admission at once (5,000
    a gateway process in the 10,000-client burst): what one wait costs, its task
    included, is what the burst costs."""
    import tracemalloc

    read = asyncio.Event()

    async def remaining(coupon: str) -> int | None:
        if waiting_for == "the stock read":
            await read.wait()
        return 1

    admission = Admission(remaining, hold_seconds=60)
    if waiting_for == "its turn":
        assert await admission.enter("C")  # takes the one unit in flight
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = [asyncio.create_task(admission.enter("C")) for _ in range(2000)]
        await asyncio.sleep(0.01)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        read.set()
        admission.sold_out("C")
        await asyncio.gather(*held)
    assert grown / len(held) < bound, f"{grown / len(held):.0f} bytes a held claim"


def test_the_services_load_no_migration_tool() -> None:
    """yoyo and what it brings (sqlparse, importlib_metadata) cost every process some
    MB; the migrations run as a command of their own."""
    import subprocess
    import sys

    code = (
        "import sys, gateway.service, consumer.service, relay.service; print('yoyo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
