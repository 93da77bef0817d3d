"""The gateway's answers: claims answered without a round trip, because the answer is
final (``GatewayAnswers``), and kept in Redis many at a time (``GatewayAnswerWriter``).

Two facts never change once true, since stock only goes down and claims are never
removed:

- a user who was granted a coupon holds it for good: another claim is ``409``;
- a coupon that ran out stays sold out, and then its holders are a closed set: a claim
  is ``409`` for a holder and ``400`` for anyone else.

The gateway learns them from the results it receives; a coupon is seen sold out when a
result says so (``400 out_of_stock``, or a grant whose batch left no stock: results are
reported only after their batch committed), and its holders are then read from the
database once. Nothing is answered from here that the
consumer would not answer the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from flashclaim.core.errors import DependencyUnavailable
from flashclaim.core.messages import ClaimCommand, ClaimResult, Outcome

log = logging.getLogger(__name__)

# Memory bound: at most this many user ids are kept, over all coupons (about 100 bytes
# each: some 20 MB per gateway process). Coupons are forgotten least recently used first;
# a sold-out coupon with more holders than that is simply not answered from here.
MAX_ENTRIES = 200_000


class GatewayAnswers:
    def __init__(
        self,
        load_holders: Callable[[str], Awaitable[list[str]]],
        max_entries: int = MAX_ENTRIES,
        on_sold_out: Callable[[str], None] | None = None,
    ) -> None:
        """``on_sold_out(coupon)`` is called once the coupon's answers are all known."""
        self._load_holders = load_holders
        self._on_sold_out = on_sold_out
        self._max = max_entries
        self._size = 0  # user ids held, over both maps
        self._holders: OrderedDict[str, set[str]] = OrderedDict()
        self._sold_out: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._loading: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def answer(self, command: ClaimCommand) -> Outcome | None:
        coupon, user = command.coupon_name, command.user_id
        closed = self._sold_out.get(coupon)
        if closed is not None:
            return Outcome.ALREADY_CLAIMED if user in closed else Outcome.OUT_OF_STOCK
        if user in self._holders.get(coupon, ()):
            return Outcome.ALREADY_CLAIMED
        return None

    def learn(self, result: ClaimResult) -> None:
        coupon, user = result.coupon_name, result.user_id
        if coupon in self._sold_out:
            return
        if result.outcome is Outcome.CLAIMED:
            holders = self._holders.setdefault(coupon, set())
            self._holders.move_to_end(coupon)
            if user not in holders:
                holders.add(user)
                self._size += 1
                self._shrink()
        sold_out = result.outcome is Outcome.OUT_OF_STOCK or (
            result.outcome is Outcome.CLAIMED and result.remaining == 0
        )
        if sold_out:
            self.sold_out(coupon)

    def sold_out(self, coupon: str) -> None:
        """The database said ``coupon`` has no stock left (a committed result, or its stock
        read as 0): read its holders, once, and answer its claims from then on."""
        if coupon in self._sold_out or coupon in self._loading:
            return
        self._loading.add(coupon)
        task = asyncio.create_task(self._load_holders_and_close(coupon))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load_holders_and_close(self, coupon: str) -> None:
        try:
            holders = frozenset(await self._load_holders(coupon))
        except Exception as exc:  # a background read; the next out-of-stock result tries again
            log.warning("sold-out coupon's holders not loaded", extra={"error": repr(exc)})
            return
        finally:
            self._loading.discard(coupon)
        if len(holders) > self._max // 2:
            log.info("sold-out coupon has too many holders to keep", extra={"coupon": coupon})
            return
        self._size -= len(self._holders.pop(coupon, ()))
        self._sold_out[coupon] = holders
        self._size += len(holders)
        self._shrink()
        if self._on_sold_out is not None and coupon in self._sold_out:
            self._on_sold_out(coupon)

    def _shrink(self) -> None:
        """Forget whole coupons, oldest first, until within the bound."""
        while self._size > self._max and (self._holders or self._sold_out):
            # Grants of open coupons go first: a sold-out coupon answers many more.
            table: OrderedDict[str, Any] = self._holders if self._holders else self._sold_out
            _, users = table.popitem(last=False)
            self._size -= len(users)


Store = Callable[[Sequence[ClaimResult]], Awaitable[None]]


class GatewayAnswerWriter:
    """Writes the answers the gateway gave to Redis, many to a command: each is kept
    briefly so that ``GET /api/claims/{id}`` finds it, and one write per answer would
    cost a Redis round trip per request; instead the answers of the last ``linger``
    seconds (at most ``max_batch``) go in one command, after the response."""

    def __init__(self, store: Store, linger: float = 0.005, max_batch: int = 500) -> None:
        self._store = store
        self._linger = linger
        self._max = max_batch
        self._pending: list[ClaimResult] = []
        self._timer: asyncio.TimerHandle | None = None
        self._writing: set[asyncio.Task[None]] = set()

    def add(self, result: ClaimResult) -> None:
        self._pending.append(result)
        if len(self._pending) >= self._max:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._linger, self._flush)

    async def drain(self) -> None:
        """Write what is pending and wait for every write in progress (shutdown, tests)."""
        self._flush()
        if self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.create_task(self._write(batch))
            self._writing.add(task)
            task.add_done_callback(self._writing.discard)

    async def _write(self, batch: list[ClaimResult]) -> None:
        try:
            await self._store(batch)
        except DependencyUnavailable as exc:  # the answers were given; only the lookup is lost
            log.warning(
                "answers given by the gateway not kept in redis",
                extra={"count": len(batch), "error": repr(exc)},
            )
