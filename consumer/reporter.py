"""Reporting committed batches and acknowledging their messages, in commit order.

A worker hands each committed batch here and goes on applying the next one: the database
never waits for Redis. One task takes the batches in the order they were committed,
writes their results to Redis (a Redis fault loses nothing: the inbox has them, and a
redelivery or a follow-up reads them there), then acknowledges the messages.

Why one cumulative ack is right: deliveries reach a consumer in order, and by the time a
batch is handed here every delivery before its last message has been settled (acked,
requeued, dead-lettered) or handed here before it. ``ack(multiple=True)`` on the last
message therefore settles exactly the batch's messages, and any that were handed here
empty (a message whose every claim went to the dead-letter queue).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable, Sequence
from typing import Protocol

from aio_pika.abc import AbstractIncomingMessage
from opentelemetry.context import Context

from consumer.store import BatchOutcome, Delivery
from flashclaim.core import tracing
from flashclaim.core.messages import ClaimResult
from flashclaim.core.retry import transient_retry

log = logging.getLogger(__name__)

# A delivered message and the claims of it that are to be reported (one, or several
# coalesced by a gateway; none if they all went to the dead-letter queue).
Received = tuple[AbstractIncomingMessage, list[Delivery]]
# At most this many committed batches wait: if Redis stalls, the worker slows down
# instead of piling them up.
DEPTH = 8


class Results(Protocol):
    """Where results go (:class:`flashclaim.core.results.ResultStore`)."""

    async def publish(self, results: Iterable[tuple[ClaimResult, str | None]]) -> None: ...


async def settle(operation: Awaitable[object]) -> None:
    """Ack, nack, reject or dead-letter a message. A channel that closed cannot settle
    anything: the broker redelivers the message, and the inbox answers it."""
    try:
        await operation
    except Exception as exc:  # whatever the channel raised, the broker redelivers
        log.warning("message not settled; the broker will redeliver it", extra={"error": repr(exc)})


class Reporter:
    """Reports to ``results`` and acknowledges, in the order batches are :meth:`put`."""

    def __init__(self, results: Results) -> None:
        self.results = results
        self._committed: asyncio.Queue[
            tuple[Sequence[Received], BatchOutcome, Context | None] | None
        ] = asyncio.Queue(maxsize=DEPTH)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reporter")

    async def put(
        self, received: Sequence[Received], outcome: BatchOutcome, trace: Context | None
    ) -> None:
        """A committed batch (or messages to acknowledge as they are); ``trace`` is the
        batch's trace context, when traced: the report's span goes under it."""
        await self._committed.put((received, outcome, trace))

    async def close(self, grace: float) -> None:
        """Report and acknowledge what was put, for at most ``grace`` seconds (a broker
        that is away cannot take the acks: the messages are redelivered and answered
        from the inbox)."""
        if self._task is None:
            return
        try:
            self._committed.put_nowait(None)
        except asyncio.QueueFull:
            self._task.cancel()
        done, _ = await asyncio.wait({self._task}, timeout=grace)
        if not done:
            self._task.cancel()
            log.warning("results of committed batches not all reported before exit")

    async def _run(self) -> None:
        while (item := await self._committed.get()) is not None:
            received, outcome, trace = item
            if trace is None:
                with tracing.untraced():
                    await self._report(received, outcome)
            else:
                with tracing.tracer().start_as_current_span("results report", context=trace):
                    await self._report(received, outcome)
            await settle(received[-1][0].ack(multiple=True))

    async def _report(self, received: Sequence[Received], outcome: BatchOutcome) -> None:
        try:
            async for attempt in transient_retry(1.0):
                with attempt:
                    await self.results.publish(
                        (outcome.results[d.command.request_id], d.command.reply_to)
                        for _, deliveries in received
                        for d in deliveries
                    )
        except Exception as exc:  # any Redis fault: the inbox has the results
            log.warning("results not published to redis", extra={"error": repr(exc)})
