"""Coalescing the claims of one coupon that arrive together into one command message.

In a flash sale many claims for the same coupon arrive within a millisecond. Published
one by one, each costs a message, a confirm and a trip through the queue; published
together, they cost one. A claim waits at most ``linger`` seconds for company (a batch
that reaches ``max_claims`` goes at once), and its publish succeeds or fails with the
confirm of the message that carries it. Claims are grouped by coupon, the routing key,
so a message goes to the one partition all its claims belong to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from flashclaim.core.messages import ClaimCommand

Publish = Callable[[Sequence[ClaimCommand]], Awaitable[None]]
Check = Callable[[], None]


@dataclass
class _Batch:
    confirmed: asyncio.Future[None]
    commands: list[ClaimCommand] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class Coalescer:
    def __init__(
        self, publish: Publish, linger: float, max_claims: int, check: Check | None = None
    ) -> None:
        """``check`` raises what a publish now would raise at once (the broker away)."""
        self._publish = publish
        self._check = check
        self._linger = linger
        self._max = max_claims
        self._open: dict[str, _Batch] = {}
        self._sending: set[asyncio.Task[None]] = set()

    def check(self) -> None:
        """Raise what a publish now would raise at once, if anything."""
        if self._check is not None:
            self._check()

    async def publish(self, command: ClaimCommand) -> None:
        """Return once the broker confirmed the message carrying ``command``; raise what
        its publish raised otherwise."""
        coupon = command.coupon_name
        batch = self._open.get(coupon)
        if batch is None:
            loop = asyncio.get_running_loop()
            batch = _Batch(loop.create_future())
            # Mark the outcome as seen: waiters that went away must not leave an
            # exception nobody retrieved.
            batch.confirmed.add_done_callback(_retrieved)
            self._open[coupon] = batch
            if self._linger > 0:
                batch.timer = loop.call_later(self._linger, self._flush, coupon, batch)
            else:  # what arrived in this turn of the event loop goes together
                loop.call_soon(self._flush, coupon, batch)
        batch.commands.append(command)
        if len(batch.commands) >= self._max:
            self._flush(coupon, batch)
        # Shielded: a request that goes away does not cancel its neighbours' publish.
        await asyncio.shield(batch.confirmed)

    def _flush(self, coupon: str, batch: _Batch) -> None:
        if self._open.get(coupon) is not batch:
            return  # already sent (full before its linger ran out)
        del self._open[coupon]
        if batch.timer is not None:
            batch.timer.cancel()
        task = asyncio.create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: _Batch) -> None:
        try:
            await self._publish(batch.commands)
        except asyncio.CancelledError:
            batch.confirmed.cancel()
            raise
        except Exception as exc:  # handed over: each claim of the batch raises it
            if not batch.confirmed.done():
                batch.confirmed.set_exception(exc)
        else:
            if not batch.confirmed.done():
                batch.confirmed.set_result(None)


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
