"""One consumer: receive a batch, apply it in one transaction, report results, then ack.

Acknowledgement protocol (the one place messages are settled):

1. poison messages (that can never apply) are rejected at once, without requeue, so the
   broker dead-letters them and they never hold up the messages behind them;
2. the rest are applied in one PostgreSQL transaction, retried on transient faults;
3. only after the commit are results written to Redis and the messages acknowledged.
   If the process dies between commit and ack, the broker redelivers and the inbox
   answers with the recorded result: the client still gets its answer, once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from aio_pika.abc import AbstractIncomingMessage
from psycopg_pool import AsyncConnectionPool

from consumer.receiver import BatchReceiver
from consumer.store import BatchOutcome, Delivery, apply_batch
from flashclaim.errors import PoisonMessage
from flashclaim.messages import ClaimCommand
from flashclaim.results import ResultStore
from flashclaim.retry import is_transient, transient_retry

log = logging.getLogger(__name__)

Pair = tuple[AbstractIncomingMessage, Delivery]


class ClaimWorker:
    def __init__(
        self,
        receiver: BatchReceiver,
        pool: AsyncConnectionPool,
        results: ResultStore,
        worker_id: str,
        retry_seconds: float = 30.0,
    ) -> None:
        self._receiver = receiver
        self._pool = pool
        self._results = results
        self._worker_id = worker_id
        self._retry_seconds = retry_seconds

    async def run(self, stop: asyncio.Event, grace: float) -> None:
        """Process batches until ``stop`` is set, then drain what was delivered.

        After ``stop``: no new deliveries are taken; messages already buffered are
        processed for at most ``grace`` seconds; any left are returned to the broker
        when the channel closes (they were never acknowledged).
        """
        await self._receiver.start()
        while not stop.is_set():
            batch = await self._receiver.next_batch(wait=0.2)
            if batch:
                await self.handle(batch)
        await self._receiver.stop()
        deadline = time.monotonic() + grace
        while self._receiver.buffered and time.monotonic() < deadline:
            await self.handle(await self._receiver.next_batch(wait=0))

    async def handle(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        started = time.perf_counter()
        pairs: list[Pair] = []
        poison = 0
        for message in messages:
            try:
                command = ClaimCommand.decode(message.message_id, message.body, message.reply_to)
            except PoisonMessage as exc:
                poison += 1
                log.warning(
                    "poison message dead-lettered",
                    extra={"message_id": message.message_id, "error": str(exc)},
                )
                await message.reject(requeue=False)
                continue
            pairs.append(
                (
                    message,
                    Delivery(
                        command=command,
                        sender=message.app_id or "unknown",
                        exchange=message.exchange or "",
                        routing_key=message.routing_key or "",
                    ),
                )
            )
        if pairs:
            await self._apply_and_settle(pairs)
        log.info(
            "batch done",
            extra={
                "size": len(messages),
                "poison": poison,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )

    async def _apply_and_settle(self, pairs: Sequence[Pair]) -> None:
        try:
            outcome = await self._apply([d for _, d in pairs])
        except Exception as exc:
            if is_transient(exc):
                # Still failing after the retry window: give the messages back to the
                # broker, whose delivery limit bounds how often this can happen.
                log.error("batch failed, requeued", extra={"error": repr(exc)})
                for message, _ in pairs:
                    await message.nack(requeue=True)
                return
            if len(pairs) > 1:
                # One bad command must not sink the batch: apply them one by one.
                log.warning("batch failed, splitting", extra={"error": repr(exc)})
                for pair in pairs:
                    await self._apply_and_settle([pair])
                return
            message = pairs[0][0]
            log.error(
                "command failed, dead-lettered",
                extra={"message_id": message.message_id, "error": repr(exc)},
            )
            await message.reject(requeue=False)
            return
        await self._report(pairs, outcome)
        # Deliveries reach this consumer in order and every earlier one is settled
        # already, so one cumulative ack covers the whole batch.
        await pairs[-1][0].ack(multiple=True)
        log.debug(
            "batch applied",
            extra={
                "applied": outcome.applied,
                "replayed": outcome.replayed,
                "granted": outcome.granted,
            },
        )

    async def _apply(self, deliveries: Sequence[Delivery]) -> BatchOutcome:
        async for attempt in transient_retry(self._retry_seconds):
            with attempt:
                async with self._pool.connection() as conn, conn.transaction():
                    return await apply_batch(conn, deliveries, self._worker_id)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _report(self, pairs: Sequence[Pair], outcome: BatchOutcome) -> None:
        """Push results to Redis; a Redis fault loses nothing (the inbox has them)."""
        try:
            await self._results.publish(
                (outcome.results[d.command.request_id], d.command.reply_to) for _, d in pairs
            )
        except Exception as exc:
            log.warning("results not published to redis", extra={"error": repr(exc)})
