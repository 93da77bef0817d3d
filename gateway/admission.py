"""Holding back claims that cannot win, so the losers of a sell-out never ride the pipeline.

A coupon with ``remaining`` in stock can grant at most that many of the claims now on
their way. This gateway process counts its claims in flight per coupon and publishes a
new one only while fewer than ``remaining`` are; the others are held, for at most
``hold`` seconds, and then:

- released, one for each claim in flight that came back without taking stock;
- or answered by the gateway itself (gateway/gateway_answers.py) once the coupon is known sold
  out, which the gateway learns only from the database (a committed result saying the
  stock is gone, or the stock read as 0; then the holders read from the database);
- or, if neither happens within ``hold``, published anyway.

``remaining`` comes from PostgreSQL: read once when a coupon is first claimed here, then
from each result, which carries the stock left once its batch committed. Stock only goes
down, so each figure is an upper bound of the stock now, and the smallest one seen is
kept. An estimate that is too high publishes more than needed, never fewer; nothing here
decides an answer (that is still the consumer's, or the gateway's own), so a wrong
figure costs speed, never correctness. Other gateway processes count their own claims:
together they publish at most their number times the stock.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from flashclaim.core.messages import ClaimResult, Outcome

log = logging.getLogger(__name__)

# Coupons tracked at most; idle ones (nothing in flight or held) are forgotten first.
MAX_COUPONS = 10_000
# How long the first claim of a coupon waits for its stock to be read, and how often an
# unknown stock (no such coupon, database away) is read again.
LOAD_TIMEOUT_SECONDS = 0.5
RELOAD_SECONDS = 1.0
# How early a hold may run out: the timers' own resolution (libuv's is a millisecond).
EXPIRY_RESOLUTION_SECONDS = 0.001


@dataclass
class _Coupon:
    remaining: int | None = None
    in_flight: int = 0
    sold_out: bool = False
    # Turns of the claims held, oldest first: True (go), False (sold out), None (the
    # hold ran out); one settled otherwise (its request gone) is skipped.
    held: collections.deque[asyncio.Future[bool | None]] = field(default_factory=collections.deque)
    loading: asyncio.Task[None] | None = None
    # The claims waiting for the read under way.
    readers: list[asyncio.Future[bool | None]] = field(default_factory=list)
    loaded_at: float = float("-inf")


class Admission:
    def __init__(
        self,
        load_remaining: Callable[[str], Awaitable[int | None]],
        hold_seconds: float,
        max_coupons: int = MAX_COUPONS,
    ) -> None:
        self._load = load_remaining
        self._hold = hold_seconds
        self._max = max_coupons
        self._coupons: collections.OrderedDict[str, _Coupon] = collections.OrderedDict()
        # The held turns with the time their hold runs out, oldest first (every hold is
        # as long, so that is also the order they run out in), and the one timer that
        # settles them: a timer a held claim (a handle, and libuv's timer under uvloop)
        # cost each of a burst's 5,000 held claims some 300 bytes more than its entry.
        self._expiries: collections.deque[tuple[float, asyncio.Future[bool | None]]] = (
            collections.deque()
        )
        self._expiry: asyncio.TimerHandle | None = None
        # Called with a coupon read from the database with no stock left: no result may
        # ever come back to say so (another process's claims took it all), so the
        # gateway's answers are told directly (GatewayAnswers.sold_out, which then calls
        # this object's sold_out).
        self.on_exhausted: Callable[[str], None] | None = None

    def holding(self) -> int:
        """Claims held back now, over all coupons."""
        return sum(
            sum(1 for turn in state.held if not turn.done()) for state in self._coupons.values()
        )

    async def enter(self, coupon: str) -> bool:
        """``True`` once a claim for ``coupon`` may be published (it is then counted in
        flight until :meth:`leave`); ``False`` if the coupon became known sold out
        meanwhile (not counted: answer it from the gateway's answers, or :meth:`count` it
        and publish it)."""
        state = self._state(coupon)
        if state.sold_out:
            return False
        if state.remaining is None:
            await self._refresh(state, coupon)
            if state.sold_out:  # learnt while the stock was read
                return False
        _drop_settled(state.held)
        if state.remaining is None or (state.in_flight < state.remaining and not state.held):
            state.in_flight += 1
            return True
        # Held: a future and its place in the expiries, nothing more. In a sell-out nearly
        # every claim of a burst waits here at once, so what one wait costs is what a
        # burst costs (a wait_for over a shield was three futures, a task's frame and
        # callbacks more).
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[bool | None] = loop.create_future()
        state.held.append(turn)
        self._expire_later(loop, turn)
        try:
            granted = await turn
        except asyncio.CancelledError:
            # The request went away while held: it takes no place in flight. A turn
            # released just before the cancellation passes its place on; one still
            # waiting was cancelled with the request and is skipped when released.
            if turn.done() and not turn.cancelled() and turn.result():
                state.in_flight = max(0, state.in_flight - 1)
                self._release(state)
            raise
        if granted is None:  # the hold ran out: published anyway
            state.in_flight += 1
            return True
        return granted

    def _expire_later(
        self, loop: asyncio.AbstractEventLoop, turn: asyncio.Future[bool | None]
    ) -> None:
        """Settle ``turn`` with ``None`` (the hold ran out) ``hold`` seconds from now, if
        nothing settled it before."""
        self._expiries.append((loop.time() + self._hold, turn))
        if self._expiry is None:
            self._expiry = loop.call_at(self._expiries[0][0], self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        # A timer may fire up to the clock's resolution early: what runs out within it
        # is due now (the next one would otherwise be scheduled for the same instant).
        due = loop.time() + EXPIRY_RESOLUTION_SECONDS
        expiries = self._expiries
        while expiries and expiries[0][0] <= due:
            _settle(expiries.popleft()[1], None)
        self._expiry = loop.call_at(expiries[0][0], self._expire, loop) if expiries else None

    def count(self, coupon: str) -> None:
        """Count in flight a claim that is published without :meth:`enter`'s consent."""
        self._state(coupon).in_flight += 1

    def leave(self, coupon: str, result: ClaimResult | None) -> None:
        """A claim counted in flight is no longer: answered (``result``) or answered 202."""
        state = self._coupons.get(coupon)
        if state is None:
            return
        state.in_flight = max(0, state.in_flight - 1)
        if result is not None:
            if result.outcome is Outcome.OUT_OF_STOCK:
                state.remaining = 0
            elif result.remaining is not None:
                state.remaining = min(result.remaining, state.remaining or result.remaining)
        self._release(state)

    def sold_out(self, coupon: str) -> None:
        """The gateway's answers now know ``coupon`` is sold out: every held claim is
        answered from them."""
        state = self._state(coupon)
        state.sold_out = True
        while state.held:
            turn = state.held.popleft()
            if not turn.done():
                turn.set_result(False)

    def _release(self, state: _Coupon) -> None:
        while state.held and (state.remaining is None or state.in_flight < state.remaining):
            turn = state.held.popleft()
            if not turn.done():
                state.in_flight += 1
                turn.set_result(True)

    async def _refresh(self, state: _Coupon, coupon: str) -> None:
        """Read the coupon's stock (once at a time, at most every RELOAD_SECONDS while
        unknown); the claims that come meanwhile wait for it, LOAD_TIMEOUT_SECONDS at
        most (one timer for them all)."""
        loop = asyncio.get_running_loop()
        if state.loading is None:
            if time.monotonic() - state.loaded_at < RELOAD_SECONDS:
                return
            state.loaded_at = time.monotonic()
            state.readers = []
            state.loading = asyncio.create_task(self._read(state, coupon, state.readers))
            loop.call_later(LOAD_TIMEOUT_SECONDS, _settle_all, state.readers)
        reader: asyncio.Future[bool | None] = loop.create_future()
        state.readers.append(reader)
        await reader

    async def _read(
        self, state: _Coupon, coupon: str, readers: list[asyncio.Future[bool | None]]
    ) -> None:
        try:
            remaining = await self._load(coupon)
        except Exception as exc:  # a background read: claims go on without holding
            log.warning("coupon stock not read", extra={"coupon": coupon, "error": repr(exc)})
            return
        finally:
            state.loading = None
            _settle_all(readers)
        if remaining is not None:
            known = state.remaining
            state.remaining = remaining if known is None else min(known, remaining)
            self._release(state)
            if remaining == 0 and self.on_exhausted is not None:
                self.on_exhausted(coupon)

    def _state(self, coupon: str) -> _Coupon:
        state = self._coupons.get(coupon)
        if state is None:
            state = self._coupons[coupon] = _Coupon()
            self._forget_idle()
        else:
            self._coupons.move_to_end(coupon)
        return state

    def _forget_idle(self) -> None:
        if len(self._coupons) <= self._max:
            return
        for name in list(self._coupons)[:-1]:  # not the one just added
            state = self._coupons[name]
            _drop_settled(state.held)
            if not state.in_flight and not state.held and state.loading is None:
                del self._coupons[name]
                if len(self._coupons) <= self._max:
                    return


def _settle(turn: asyncio.Future[bool | None], value: bool | None) -> None:
    if not turn.done():
        turn.set_result(value)


def _settle_all(waiting: list[asyncio.Future[bool | None]]) -> None:
    for turn in waiting:
        _settle(turn, None)
    waiting.clear()


def _drop_settled(held: collections.deque[asyncio.Future[bool | None]]) -> None:
    """Forget the turns at the head that are settled already (their hold ran out, or
    their request went away), so that they hold no later claim back."""
    while held and held[0].done():
        held.popleft()
