"""One consumer: receive a batch, apply it in one transaction, report results, then ack.

Acknowledgement protocol (settled in this module and consumer/reporter.py only):

1. poison messages (that can never apply) go to the dead-letter queue at once, so they
   never hold up the messages behind them; a poison claim inside a message that carries
   several goes there alone, and if the DLQ cannot take it the message is requeued;
2. the rest are applied in one PostgreSQL transaction. A lost race (deadlock,
   serialization failure) runs again a few times. A database outage is not the
   messages' fault: the consumer stops taking new ones, holds those it has
   unacknowledged, and waits for the database to come back;
3. only after the commit are results written to Redis and the messages acknowledged
   (consumer/reporter.py). If the process dies between commit and ack, the broker
   redelivers and the inbox answers with the recorded result: the client still gets its
   answer, once;
4. a batch that fails for another reason is split message by message, so that one bad
   command cannot sink the others; a message that still fails is applied claim by claim
   (a message of one claim has had its try). Each claim that fails has the failure
   counted in its inbox row (``retry_count``: the project's own count, whatever the
   broker's version counts); at ``max_attempts`` failures it is FAILED in the inbox and
   dead-lettered alone, with the error;
5. a message is settled once, for all the claims it carries: acked (after its applied
   claims are reported) when each claim is applied or dead-lettered; requeued if any
   claim is to be tried again or its dead letter was not taken, in which case the claims
   that did apply are answered from the inbox when the message comes back. A message is
   never acked before every claim it carries has its effect committed or its dead letter
   confirmed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage
from opentelemetry import trace
from opentelemetry.context import Context
from tenacity import RetryCallState

from consumer.dlq_publisher import DeadLetterPublisher
from consumer.receiver import BatchReceiver
from consumer.reporter import Received, Reporter, settle
from consumer.store import Attempts, BatchOutcome, ClaimStore, Delivery
from flashclaim.core import tracing
from flashclaim.core.deadletters import delivery_count
from flashclaim.core.errors import PoisonMessage, Stopping
from flashclaim.core.messages import decode_claims
from flashclaim.core.metrics import ConsumerMetrics
from flashclaim.core.retry import contention_retry, is_outage, outage_retry

log = logging.getLogger(__name__)

# How long a stopping worker waits for the reports and acks of committed batches.
REPORT_GRACE_SECONDS = 3.0


@dataclass(frozen=True, slots=True)
class Applied:
    """A committed transaction's outcome, with its trace context when traced (the
    report's span goes under it)."""

    outcome: BatchOutcome
    trace: Context | None = None


def chunks(received: Sequence[Received], batch_claims: int) -> list[list[Received]]:
    """Consecutive messages with at most ``batch_claims`` claims together (a message
    with more is a chunk of its own): one transaction each."""
    out: list[list[Received]] = []
    claims = batch_claims
    for item in received:
        if claims + len(item[1]) > batch_claims:
            out.append([])
            claims = 0
        out[-1].append(item)
        claims += len(item[1])
    return out


def _traceparent(message: AbstractIncomingMessage) -> str | None:
    value = message.headers.get("traceparent") if message.headers else None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return value if isinstance(value, str) else None


@dataclass(eq=False)
class ClaimWorker:
    """Takes batches from ``receiver``, applies them to ``store``, has ``reporter``
    report and acknowledge them, and moves what cannot apply to ``dead_letters``; about
    ``batch_claims`` claims to a transaction."""

    receiver: BatchReceiver
    store: ClaimStore
    reporter: Reporter
    dead_letters: DeadLetterPublisher
    batch_claims: int = 200
    metrics: ConsumerMetrics = field(default_factory=lambda: ConsumerMetrics(enabled=False))
    _stop: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _holding: bool = field(default=False, init=False)

    async def run(self, stop: asyncio.Event, grace: float) -> None:
        """Process batches until ``stop`` is set, then drain what was delivered.

        After ``stop``: no new deliveries are taken; messages already buffered are
        processed for at most ``grace`` seconds; any left are returned to the broker
        when the channel closes (they were never acknowledged).
        """
        self._stop = stop
        self.reporter.start()
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
            except Exception as exc:  # any broker fault: nothing more is delivered
                log.warning("subscription not cancelled", extra={"error": repr(exc)})
            while self.receiver.buffered and time.monotonic() < deadline:
                await self.handle(await self.receiver.next_batch(wait=0))
        except Stopping:
            log.info("stopped while the database was unavailable; messages go back")
        finally:
            await self.reporter.close(REPORT_GRACE_SECONDS)

    async def handle(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        """Settle ``messages``: poison ones dead-lettered, the rest applied (protocol)."""
        started = time.perf_counter()
        received, claims, poison = await self._intake(messages)
        applied = [await self._apply_chunk(chunk) for chunk in chunks(received, self.batch_claims)]
        outcome = BatchOutcome.total(a.outcome for a in applied if a is not None)
        log.info(
            "batch done",
            extra={
                "size": len(messages),
                "claims": claims,
                "poison": poison,
                "applied": outcome.applied,
                "replayed": outcome.replayed,
                "granted": outcome.granted,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )

    async def _intake(
        self, messages: Sequence[AbstractIncomingMessage]
    ) -> tuple[list[Received], int, int]:
        """Decode ``messages``; dead-letter what is poison (protocol, step 1). The claims
        left to apply, and how many claims and poison ones there were."""
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
                await settle(self.dead_letters.send(message, "poison", exc))
                continue
            claims += len(decoded.commands) + len(decoded.poison)
            taken = True
            for claim in decoded.poison:
                taken = await self.dead_letters.send_claim(
                    message, claim.request_id, claim.body, "poison", claim.error
                )
                if not taken:
                    break
            if not taken:
                await settle(message.nack(requeue=True))
                continue
            poison += len(decoded.poison)
            m.dead_letters.labels("poison").inc(len(decoded.poison))
            origin = (
                message.app_id or "unknown",
                message.exchange or "",
                message.routing_key or "",
            )
            received.append((message, [Delivery(c, *origin) for c in decoded.commands]))
        return received, claims, poison

    async def _apply_chunk(self, chunk: Sequence[Received]) -> Applied | None:
        """Apply ``chunk`` in one transaction and hand it to the reporter; on a failure,
        message by message, then claim by claim (protocol, step 4)."""
        deliveries = [d for _, ds in chunk for d in ds]
        if not deliveries:  # every claim these messages carried is in the DLQ now
            await self.reporter.put(chunk, BatchOutcome.total(()), None)
            return None
        try:
            applied = await self._apply(deliveries)
        except Stopping:
            raise
        except Exception as exc:  # whatever it was, it is counted against the claims
            if len(chunk) > 1:
                log.warning("batch failed, splitting", extra={"error": repr(exc)})
                for one in chunk:
                    await self._apply_chunk([one])
                return None
            await self._claim_by_claim(chunk[0], exc)
            return None
        await self.reporter.put(chunk, applied.outcome, applied.trace)
        return applied

    async def _claim_by_claim(self, received: Received, exc: BaseException) -> None:
        """One message failed: apply its claims one at a time (a message of one claim
        has had its try: ``exc``), count each failure, and settle the message once for
        all of them (protocol, step 5)."""
        message, deliveries = received
        failed: list[tuple[Delivery, BaseException]] = []
        done: list[Delivery] = []
        outcomes: list[BatchOutcome] = []
        last: Context | None = None
        if len(deliveries) == 1:
            failed.append((deliveries[0], exc))
        else:
            log.warning(
                "message failed, claim by claim",
                extra={"message_id": message.message_id, "error": repr(exc)},
            )
            for delivery in deliveries:
                try:
                    applied = await self._apply([delivery])
                except Stopping:
                    raise
                except Exception as claim_exc:  # as above: counted against the claim
                    failed.append((delivery, claim_exc))
                    continue
                done.append(delivery)
                outcomes.append(applied.outcome)
                last = applied.trace
        again = False
        for delivery, error in failed:
            if not await self._failed(message, delivery, error):
                again = True
        if again:
            log.warning("message requeued", extra={"message_id": message.message_id})
            await settle(message.nack(requeue=True))
            return
        await self.reporter.put([(message, done)], BatchOutcome.total(outcomes), last)

    async def _failed(
        self, message: AbstractIncomingMessage, delivery: Delivery, error: BaseException
    ) -> bool:
        """Count a claim's failed attempt; at the last one, dead-letter the claim alone.
        ``True`` when the claim is done with (in the DLQ), ``False`` when its message
        must come back (to be tried again, or because the DLQ did not take it)."""
        attempts = await self._attempts(message, delivery, error)
        request_id = str(delivery.command.request_id)
        if not attempts.final:
            self.metrics.retries.inc()
            log.warning(
                "command failed; requeued",
                extra={"request_id": request_id, "attempt": attempts.count, "error": repr(error)},
            )
            return False
        if not await self.dead_letters.send_claim(
            message, request_id, delivery.command.body(), "failed", error, attempts.count
        ):
            return False
        self.metrics.dead_letters.labels("failed").inc()
        return True

    async def _attempts(
        self, message: AbstractIncomingMessage, delivery: Delivery, error: BaseException
    ) -> Attempts:
        """A claim's failed attempts so far, this one included, as counted in the inbox
        or, if the inbox cannot be written, by the broker."""
        max_attempts = self.store.max_attempts
        try:
            counted = await self.store.record_failure(delivery, error)
        except Exception as exc:  # any database fault: the broker's count stands in
            log.warning("failure not recorded in the inbox", extra={"error": repr(exc)})
            count = delivery_count(message) + 1
            return Attempts(count, count >= max_attempts)
        # None: applied meanwhile by another delivery; the redelivery is answered from
        # the inbox.
        return counted if counted is not None else Attempts(max_attempts, final=False)

    async def _apply(self, deliveries: Sequence[Delivery]) -> Applied:
        started = time.perf_counter()
        if not tracing.enabled():
            applied = Applied(await self._apply_through_faults(deliveries))
        elif not any(d.command.trace for d in deliveries):  # none sampled: no span at all
            with tracing.untraced():
                applied = Applied(await self._apply_through_faults(deliveries))
        else:
            applied = await self._apply_traced(deliveries)
        outcome, m = applied.outcome, self.metrics
        m.apply_seconds.observe(time.perf_counter() - started)
        m.batch_claims.observe(outcome.applied + outcome.replayed)
        for code, n in outcome.decided.items():
            m.claims.labels(code).inc(n)
        if outcome.replayed:
            m.inbox_duplicates.inc(outcome.replayed)
        return applied

    async def _apply_traced(self, deliveries: Sequence[Delivery]) -> Applied:
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
            outcome = await self._apply_through_faults(deliveries)
            batch.set_attribute("flashclaim.granted", outcome.granted)
            batch_trace = trace.set_span_in_context(batch)
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
                links=tracing.links([batch_trace]),
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
        return Applied(outcome, batch_trace)

    async def _apply_through_faults(self, deliveries: Sequence[Delivery]) -> BatchOutcome:
        """One transaction, run again after a lost race, and held through an outage
        until the database is back or the worker stops (protocol, step 2)."""
        try:
            async for outage in outage_retry(self._stop, self._hold):
                with outage:
                    async for attempt in contention_retry():
                        with attempt:
                            return await self.store.apply(deliveries)
        except Exception as exc:  # re-raised, unless it is an outage met while stopping
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
