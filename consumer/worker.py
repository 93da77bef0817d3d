"""One consumer: receive a batch, apply it in one transaction, report results, then ack.

Acknowledgement protocol (the one place messages are settled):

1. poison messages (that can never apply) go to the dead-letter queue at once, so they
   never hold up the messages behind them;
2. the rest are applied in one PostgreSQL transaction. A lost race (deadlock,
   serialization failure) runs again a few times. A database outage is not the
   messages' fault: the consumer stops taking new ones, holds those it has
   unacknowledged, and waits for the database to come back;
3. only after the commit are results written to Redis and the messages acknowledged.
   If the process dies between commit and ack, the broker redelivers and the inbox
   answers with the recorded result: the client still gets its answer, once;
4. a batch that fails for another reason is split, so that one bad command cannot sink
   the others; a single command that fails has the failure counted in its inbox row
   (``retry_count``: the project's own count, whatever the broker's version counts) and
   is retried through the broker (nack with requeue) until ``max_attempts`` failures,
   then it is FAILED in the inbox and dead-lettered with the error;
5. a message that carries several claims (a gateway coalesced them) is settled once, for
   all of them: acked when each claim is applied or dead-lettered alone; nacked with
   requeue if any claim is to be tried again, in which case the claims that did apply are
   answered from the inbox when the message comes back. A message is never acked before
   every claim it carries has its effect committed or its dead letter confirmed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson
from aio_pika.abc import AbstractIncomingMessage
from opentelemetry import trace
from opentelemetry.context import Context
from psycopg_pool import AsyncConnectionPool
from tenacity import RetryCallState

from consumer.deadletter import DeadLetterPublisher
from consumer.receiver import BatchReceiver
from consumer.store import BatchOutcome, Delivery, apply_batch
from flashclaim.core import tracing
from flashclaim.core.db import queries
from flashclaim.core.deadletters import delivery_count
from flashclaim.core.errors import PoisonMessage
from flashclaim.core.messages import CLAIM_EVENT, ClaimResult, PoisonClaim, decode_claims
from flashclaim.core.metrics import ConsumerMetrics
from flashclaim.core.results import ResultStore
from flashclaim.core.retry import contention_retry, is_outage, outage_retry, transient_retry

log = logging.getLogger(__name__)

# A delivered message and the claims it carries (one, or several coalesced).
Received = tuple[AbstractIncomingMessage, list[Delivery]]
# How long a stopping worker waits for the reports and acks of committed batches.
REPORT_GRACE_SECONDS = 3.0


@dataclass(frozen=True, slots=True)
class WorkerPolicy:
    """How a worker names itself in the inbox (``locked_by``), how many failed attempts
    a command gets, and about how many claims one transaction applies."""

    worker_id: str
    max_attempts: int = 3
    batch_claims: int = 200


def _total(outcomes: Sequence[BatchOutcome]) -> BatchOutcome | None:
    if not outcomes:
        return None
    results: dict[uuid.UUID, ClaimResult] = {}
    decided: Counter[str] = Counter()
    for o in outcomes:
        results.update(o.results)
        decided.update(o.decided)
    return BatchOutcome(
        results,
        applied=sum(o.applied for o in outcomes),
        replayed=sum(o.replayed for o in outcomes),
        granted=sum(o.granted for o in outcomes),
        decided=decided,
    )


def _traceparent(message: AbstractIncomingMessage) -> str | None:
    value = message.headers.get("traceparent") if message.headers else None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return value if isinstance(value, str) else None


class Stopping(Exception):
    """Shutdown was requested while waiting for a server to come back."""


@dataclass(eq=False)
class ClaimWorker:
    """Takes batches from ``receiver``, applies them through ``pool``, reports to
    ``results`` and moves what cannot apply to ``dead_letters``, under ``policy``."""

    receiver: BatchReceiver
    pool: AsyncConnectionPool
    results: ResultStore
    dead_letters: DeadLetterPublisher
    policy: WorkerPolicy
    metrics: ConsumerMetrics = field(default_factory=lambda: ConsumerMetrics(enabled=False))
    _stop: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _holding: bool = field(default=False, init=False)
    # Committed batches waiting to be reported and acknowledged (bounded: if Redis
    # stalls, the consumer slows down instead of piling up).
    # With the trace context of the batch, when traced: the report's spans go under it.
    _committed: asyncio.Queue[tuple[Sequence[Received], BatchOutcome, Context | None] | None] = (
        field(default_factory=lambda: asyncio.Queue(maxsize=8), init=False)
    )
    # The context of the batch :meth:`_apply` applied last (traced only).
    _batch_trace: Context | None = field(default=None, init=False)

    async def run(self, stop: asyncio.Event, grace: float) -> None:
        """Process batches until ``stop`` is set, then drain what was delivered.

        After ``stop``: no new deliveries are taken; messages already buffered are
        processed for at most ``grace`` seconds; any left are returned to the broker
        when the channel closes (they were never acknowledged).
        """
        self._stop = stop
        reporter = asyncio.create_task(self._report_in_order(), name="reporter")
        await self.receiver.start()
        try:
            while not stop.is_set():
                batch = await self.receiver.next_batch(wait=0.2)
                if batch:
                    await self.handle(batch)
            deadline = time.monotonic() + grace
            # With the broker away, cancelling the subscription cannot be confirmed:
            # the deliveries it would stop are not coming anyway.
            try:
                await asyncio.wait_for(self.receiver.stop(), max(grace, 0.1))
            except Exception as exc:
                log.warning("subscription not cancelled", extra={"error": repr(exc)})
            while self.receiver.buffered and time.monotonic() < deadline:
                await self.handle(await self.receiver.next_batch(wait=0))
        except Stopping:
            log.info("stopped while the database was unavailable; messages go back")
        finally:
            # Committed batches still get their results reported and their acks, for a
            # bounded time (a broker that is away cannot take the acks: the messages are
            # redelivered and answered from the inbox).
            try:
                self._committed.put_nowait(None)
            except asyncio.QueueFull:
                reporter.cancel()
            done, _ = await asyncio.wait({reporter}, timeout=REPORT_GRACE_SECONDS)
            if not done:
                reporter.cancel()
                log.warning("results of committed batches not all reported before exit")

    async def handle(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        started = time.perf_counter()
        received: list[Received] = []
        claims = poison = 0
        m = self.metrics
        now = time.time()
        for message in messages:
            m.messages.inc()
            if message.redelivered:
                m.redeliveries.inc()
            if message.timestamp is not None:
                m.message_age.observe(max(now - message.timestamp.timestamp(), 0.0))
            try:
                decoded = decode_claims(
                    message.message_id, message.body, message.reply_to, _traceparent(message)
                )
            except PoisonMessage as exc:
                poison += 1
                m.dead_letters.labels("poison").inc()
                await self._settle(self.dead_letters.send(message, "poison", exc))
                continue
            claims += len(decoded.commands) + len(decoded.poison)
            if not await self._dead_letter_poison(message, decoded.poison):
                continue
            poison += len(decoded.poison)
            m.dead_letters.labels("poison").inc(len(decoded.poison))
            if not decoded.commands:  # every claim it carried is in the DLQ now
                await self._settle(message.ack())
                continue
            origin = (
                message.app_id or "unknown",
                message.exchange or "",
                message.routing_key or "",
            )
            received.append((message, [Delivery(c, *origin) for c in decoded.commands]))
        outcomes = [await self._apply_and_settle(chunk) for chunk in self._chunks(received)]
        outcome = _total([o for o in outcomes if o is not None])
        log.info(
            "batch done",
            extra={
                "size": len(messages),
                "claims": claims,
                "poison": poison,
                "applied": outcome.applied if outcome else 0,
                "replayed": outcome.replayed if outcome else 0,
                "granted": outcome.granted if outcome else 0,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )

    def _chunks(self, received: list[Received]) -> list[list[Received]]:
        """Consecutive messages with at most ``batch_claims`` claims together (a message
        with more is a chunk of its own): one transaction each."""
        chunks: list[list[Received]] = []
        claims = self.policy.batch_claims
        for item in received:
            if claims + len(item[1]) > self.policy.batch_claims:
                chunks.append([])
                claims = 0
            chunks[-1].append(item)
            claims += len(item[1])
        return chunks

    async def _dead_letter_poison(
        self, message: AbstractIncomingMessage, poison: Sequence[PoisonClaim]
    ) -> bool:
        """Dead-letter each poison claim of ``message`` alone; ``False`` (and the message
        requeued) if the DLQ did not take one of them."""
        for claim in poison:
            sent = await self.dead_letters.send_claim(
                message, claim.message_id, claim.body, "poison", claim.error
            )
            if not sent:
                await self._settle(message.nack(requeue=True))
                return False
        return True

    async def _apply_and_settle(self, received: Sequence[Received]) -> BatchOutcome | None:
        deliveries = [d for _, ds in received for d in ds]
        started = time.perf_counter()
        try:
            outcome = await self._apply(deliveries)
        except Stopping:
            raise
        except Exception as exc:
            if len(received) > 1:
                # One bad command must not sink the batch: apply message by message.
                log.warning("batch failed, splitting", extra={"error": repr(exc)})
                for one in received:
                    await self._apply_and_settle([one])
                return None
            await self._claim_by_claim(received[0], exc)
            return None
        self._count(outcome, started)
        # Reporting and acknowledging happen in another task, in commit order, while
        # this one already applies the next batch: the database never waits for Redis.
        await self._committed.put((received, outcome, self._batch_trace))
        return outcome

    def _count(self, outcome: BatchOutcome, started: float) -> None:
        m = self.metrics
        m.apply_seconds.observe(time.perf_counter() - started)
        m.batch_claims.observe(outcome.applied + outcome.replayed)
        for code, n in outcome.decided.items():
            m.claims.labels(code).inc(n)
        if outcome.replayed:
            m.inbox_duplicates.inc(outcome.replayed)

    async def _claim_by_claim(self, received: Received, exc: BaseException) -> None:
        """One message failed: apply its claims one at a time, count the failures, and
        settle the message once for all of them (protocol, step 5)."""
        message, deliveries = received
        if len(deliveries) == 1:
            await self._failed_attempt(message, deliveries[0], exc)
            return
        log.warning("message failed, claim by claim", extra={"error": repr(exc)})
        applied: list[Delivery] = []
        outcomes: list[BatchOutcome] = []
        again = False
        for delivery in deliveries:
            started = time.perf_counter()
            try:
                outcome = await self._apply([delivery])
            except Stopping:
                raise
            except Exception as claim_exc:
                attempts, final = await self._attempts(message, delivery, claim_exc)
                if not final:
                    self.metrics.retries.inc()
                    again = True
                    continue
                request_id = str(delivery.command.request_id)
                if await self.dead_letters.send_claim(
                    message, request_id, delivery.command.body(), "failed", claim_exc, attempts
                ):
                    self.metrics.dead_letters.labels("failed").inc()
                else:
                    again = True
                continue
            self._count(outcome, started)
            applied.append(delivery)
            outcomes.append(outcome)
        if again:
            log.warning("message requeued", extra={"message_id": message.message_id})
            await self._settle(message.nack(requeue=True))
            return
        total = _total(outcomes) or BatchOutcome({}, applied=0, replayed=0, granted=0)
        await self._committed.put(([(message, applied)], total, self._batch_trace))

    async def _report_in_order(self) -> None:
        while (item := await self._committed.get()) is not None:
            received, outcome, trace = item
            if trace is None:
                await self._report(received, outcome)
            else:
                with tracing.tracer().start_as_current_span("results report", context=trace):
                    await self._report(received, outcome)
            # Deliveries reach this consumer in order and each earlier one is settled or
            # queued here before this one, so one cumulative ack covers the batch. (A
            # message from a channel that has since closed cannot be acked: it is
            # redelivered, and the inbox answers it.)
            await self._settle(received[-1][0].ack(multiple=True))

    async def _apply(self, deliveries: Sequence[Delivery]) -> BatchOutcome:
        if not tracing.enabled():
            return await self._apply_untraced(deliveries)
        # The batch span: a child of its first claim's trace, linked to every claim;
        # PostgreSQL's spans go under it. Each claim then gets a span of its own in its
        # own trace, linked to the batch.
        contexts = [tracing.context_of(d.command.trace) for d in deliveries]
        tracer = tracing.tracer()
        started = time.time_ns()
        with tracer.start_as_current_span(
            "claims apply",
            context=next((c for c in contexts if c is not None), None),
            links=tracing.links(contexts),
            attributes={"flashclaim.claims": len(deliveries)},
        ) as batch:
            outcome = await self._apply_untraced(deliveries)
            batch.set_attribute("flashclaim.granted", outcome.granted)
            self._batch_trace = trace.set_span_in_context(batch)
        ended = time.time_ns()
        for delivery, context in zip(deliveries, contexts, strict=True):
            if context is None:
                continue
            command = delivery.command
            result = outcome.results.get(command.request_id)
            tracer.start_span(
                "claim process",
                context=context,
                kind=tracing.SpanKind.CONSUMER,
                links=tracing.links([self._batch_trace]),
                start_time=started,
                attributes={
                    "messaging.system": "rabbitmq",
                    "messaging.operation.type": "process",
                    "messaging.destination.name": delivery.routing_key,
                    "flashclaim.request_id": str(command.request_id),
                    "flashclaim.coupon": command.coupon_name,
                    "flashclaim.outcome": result.outcome.code if result else "unknown",
                },
            ).end(end_time=ended)
        return outcome

    async def _apply_untraced(self, deliveries: Sequence[Delivery]) -> BatchOutcome:
        try:
            async for outage in outage_retry(self._stop, self._hold):
                with outage:
                    async for attempt in contention_retry():
                        with attempt:
                            async with (
                                self.pool.connection(timeout=5.0) as conn,
                                conn.transaction(),
                            ):
                                return await apply_batch(conn, deliveries, self.policy.worker_id)
        except Exception as exc:
            if self._stop.is_set() and is_outage(exc):
                raise Stopping from exc
            raise
        finally:
            if self._holding:
                self._holding = False
                self.metrics.holding.set(0)
                log.info("database is back; resuming")
                await self.receiver.start()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _hold(self, state: RetryCallState) -> None:
        """Database outage: take no new messages, keep the ones in hand unacknowledged."""
        if not self._holding:
            self._holding = True
            self.metrics.holding.set(1)
            exc = state.outcome.exception() if state.outcome else None
            log.error("database unavailable; holding messages", extra={"error": repr(exc)})
            await self.receiver.stop()

    async def _failed_attempt(
        self, message: AbstractIncomingMessage, delivery: Delivery, exc: BaseException
    ) -> None:
        """Count the attempt in the inbox; retry through the broker, or fail for good."""
        attempts, final = await self._attempts(message, delivery, exc)
        if final:
            self.metrics.dead_letters.labels("failed").inc()
            await self._settle(self.dead_letters.send(message, "failed", exc, attempts))
        else:
            self.metrics.retries.inc()
            log.warning(
                "command failed; requeued",
                extra={"message_id": message.message_id, "attempt": attempts, "error": repr(exc)},
            )
            await self._settle(message.nack(requeue=True))

    async def _attempts(
        self, message: AbstractIncomingMessage, delivery: Delivery, exc: BaseException
    ) -> tuple[int, bool]:
        """``(failed attempts so far, final?)`` for a claim that failed just now."""
        counted = await self._record_failure(delivery, exc)
        if counted is not None:
            return counted
        # The inbox could not count it: fall back on the broker's own counter.
        attempts = delivery_count(message) + 1
        return attempts, attempts >= self.policy.max_attempts

    async def _record_failure(
        self, delivery: Delivery, exc: BaseException
    ) -> tuple[int, bool] | None:
        """``(failed attempts so far, final?)`` as counted in the inbox; ``None`` if the
        inbox could not be written (then nothing is known)."""
        command = delivery.command
        try:
            async for attempt in transient_retry(2.0):
                with attempt:
                    async with self.pool.connection(timeout=2.0) as conn:
                        cur = await conn.execute(
                            queries()["inbox_record_failure"],
                            {
                                "message_id": command.request_id,
                                "sender": delivery.sender,
                                "payload": orjson.dumps(
                                    {"user_id": command.user_id, "coupon_name": command.coupon_name}
                                ).decode(),
                                "max_attempts": self.policy.max_attempts,
                                "event_type": CLAIM_EVENT,
                                "exchange": delivery.exchange,
                                "routing_key": delivery.routing_key,
                                "error": f"{type(exc).__name__}: {exc}"[:2000],
                            },
                        )
                        row = await cur.fetchone()
        except Exception as record_exc:
            log.warning("failure not recorded in the inbox", extra={"error": repr(record_exc)})
            return None
        if row is None:  # PROCESSED meanwhile (by another delivery): nothing to retry
            return self.policy.max_attempts, False
        retry_count, status = row
        return int(retry_count), status == "FAILED"

    async def _report(self, received: Sequence[Received], outcome: BatchOutcome) -> None:
        """Push results to Redis; a Redis fault loses nothing (the inbox has them)."""
        try:
            async for attempt in transient_retry(1.0):
                with attempt:
                    await self.results.publish(
                        (outcome.results[d.command.request_id], d.command.reply_to)
                        for _, deliveries in received
                        for d in deliveries
                    )
        except Exception as exc:
            log.warning("results not published to redis", extra={"error": repr(exc)})

    @staticmethod
    async def _settle(operation: object) -> None:
        """Ack, nack or dead-letter; a closed channel means the broker redelivers."""
        try:
            await operation  # type: ignore[misc]
        except Exception as exc:
            log.warning(
                "message not settled; the broker will redeliver it", extra={"error": repr(exc)}
            )
