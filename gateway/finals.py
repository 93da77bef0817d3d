"""Claim answers the gateway can give without a round trip, because they are final.

Two facts never change once true, since stock only goes down and claims are never
removed:

- a user who was granted a coupon holds it for good: another claim is ``409``;
- a coupon that ran out stays sold out, and then its holders are a closed set: a claim
  is ``409`` for a holder and ``400`` for anyone else.

The gateway learns them from the results it receives; a coupon's holders are read from
the database once, when it is seen sold out. Nothing is answered from here that the
consumer would not answer the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from flashclaim.messages import ClaimCommand, ClaimResult, Outcome

log = logging.getLogger(__name__)

MAX_COUPONS = 1000


class FinalAnswers:
    def __init__(self, load_holders: Callable[[str], Awaitable[list[str]]]) -> None:
        self._load_holders = load_holders
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
        coupon = result.body.get("coupon_name")
        user = result.body.get("user_id")
        if not isinstance(coupon, str) or not isinstance(user, str):
            return
        if result.status == Outcome.CLAIMED.status:
            holders = self._holders.get(coupon)
            if holders is None:
                holders = self._holders[coupon] = set()
                while len(self._holders) > MAX_COUPONS:
                    self._holders.popitem(last=False)
            holders.add(user)
        elif (
            result.body.get("code") == Outcome.OUT_OF_STOCK.code
            and coupon not in self._sold_out
            and coupon not in self._loading
        ):
            self._loading.add(coupon)
            task = asyncio.create_task(self._close(coupon))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _close(self, coupon: str) -> None:
        try:
            holders = frozenset(await self._load_holders(coupon))
        except Exception as exc:  # the next out-of-stock result tries again
            log.warning("sold-out coupon's holders not loaded", extra={"error": repr(exc)})
            return
        finally:
            self._loading.discard(coupon)
        self._sold_out[coupon] = holders
        self._holders.pop(coupon, None)
        while len(self._sold_out) > MAX_COUPONS:
            self._sold_out.popitem(last=False)
