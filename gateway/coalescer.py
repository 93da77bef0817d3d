"""Coalescing the claims of one coupon that arrive together into one command message.

In a flash sale many claims for the same coupon arrive within a millisecond. Published
one by one, each costs a message, a confirm and a trip through the queue; published
together, they cost one. Batching is natural, as in a database's group commit: while
``in_flight`` messages of a coupon await their confirm, the claims that arrive wait and
go together in the next message, sent when one of those confirms comes back (or at once
when it holds ``max_claims``). A quiet coupon's claim goes straight away, with those
arriving in the same turn of the event loop. So the batch grows with the load and no
claim waits on a timer. A claim's publish succeeds or fails with the confirm of the
message that carries it. Claims are grouped by coupon, the routing key, so a message goes
to the one partition all its claims belong to.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from flashclaim.core.messages import ClaimCommand

Publish = Callable[[Sequence[ClaimCommand]], Awaitable[None]]


@dataclass
class _Batch:
    confirmed: asyncio.Future[None]
    commands: list[ClaimCommand] = field(default_factory=list)
    scheduled: bool = False  # a send is due in this turn of the event loop


class Coalescer:
    def __init__(self, publish: Publish, in_flight: int, max_claims: int) -> None:
        self._publish = publish
        self._in_flight = in_flight
        self._max = max_claims
        self._open: dict[str, _Batch] = {}
        self._flying: Counter[str] = Counter()  # messages awaiting their confirm
        self._sending: set[asyncio.Task[None]] = set()

    async def publish(self, command: ClaimCommand) -> None:
        """Return once the broker confirmed the message carrying ``command``; raise what
        its publish raised otherwise."""
        coupon = command.coupon_name
        batch = self._open.get(coupon)
        if batch is None:
            batch = self._open[coupon] = _Batch(asyncio.get_running_loop().create_future())
            # Mark the outcome as seen: waiters that went away must not leave an
            # exception nobody retrieved.
            batch.confirmed.add_done_callback(_retrieved)
        batch.commands.append(command)
        if len(batch.commands) >= self._max:
            self._send(coupon)
        elif self._flying[coupon] < self._in_flight:
            self._soon(coupon, batch)
        # Otherwise it goes when a message of this coupon is confirmed (see _sent).
        # Shielded: a request that goes away does not cancel its neighbours' publish.
        await asyncio.shield(batch.confirmed)

    def _soon(self, coupon: str, batch: _Batch) -> None:
        if not batch.scheduled:
            batch.scheduled = True
            asyncio.get_running_loop().call_soon(self._send_if_open, coupon, batch)

    def _send_if_open(self, coupon: str, batch: _Batch) -> None:
        if self._open.get(coupon) is batch:
            self._send(coupon)

    def _send(self, coupon: str) -> None:
        batch = self._open.pop(coupon)
        self._flying[coupon] += 1
        task = asyncio.create_task(self._carry(coupon, batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _carry(self, coupon: str, batch: _Batch) -> None:
        try:
            await self._publish(batch.commands)
        except asyncio.CancelledError:
            batch.confirmed.cancel()
            raise
        except Exception as exc:
            if not batch.confirmed.done():
                batch.confirmed.set_exception(exc)
        else:
            if not batch.confirmed.done():
                batch.confirmed.set_result(None)
        finally:
            self._sent(coupon)

    def _sent(self, coupon: str) -> None:
        """A message of ``coupon`` is settled: the claims that waited for it go now."""
        self._flying[coupon] -= 1
        if self._flying[coupon] <= 0:
            del self._flying[coupon]
        waiting = self._open.get(coupon)
        if waiting is not None:
            self._soon(coupon, waiting)


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
