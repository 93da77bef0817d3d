"""One relay step: publish a batch of outbox rows, then mark them sent.

Protocol (one step, one PostgreSQL transaction):

1. take the oldest due PENDING rows ``FOR UPDATE SKIP LOCKED``: no other relay can take
   them before this transaction ends, so two relays never publish one row at the same
   time. A row is taken only with every pending row of its coupon before it, so a
   coupon's events are published in commit order (``outbox_take`` in queries.sql);
2. publish them in that order on one channel (persistent, publisher confirms; runs of one
   type share a message, ``flashclaim/core/events.py``) and wait for every confirm;
3. in the same transaction, mark the confirmed rows SENT and count each refused one
   (a nack of its message) as an attempt, with a backoff before the next, FAILED at
   the bound; commit.

A relay that dies between 2 and 3 never commits: its rows stay PENDING and the next
step publishes them again under the same event ids (at-least-once; subscribers
de-duplicate by ``event_id``). A broker that is away, or confirms that do not come
within the publish timeout, roll the step back without counting an attempt: the rows
wait for the broker. The commit is not waited for on disk (``synchronous_commit`` off
on the relay's connections): a SENT mark lost to a crash only repeats an event.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import aiormq
from aio_pika.abc import AbstractRobustConnection
from opentelemetry.trace import Span
from pamqp.common import FieldTable
from psycopg_pool import AsyncConnectionPool

from flashclaim.core import broker, tracing
from flashclaim.core import events as events_
from flashclaim.core.db import queries
from flashclaim.core.errors import DependencyUnavailable
from flashclaim.core.events import Event
from flashclaim.core.metrics import RelayMetrics
from flashclaim.core.topology import Topology

log = logging.getLogger(__name__)
APP_ID = "flashclaim-relay"


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    relay_id: str
    batch_size: int = 500
    max_attempts: int = 10
    retry_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    publish_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Step:
    taken: int  # rows locked, held back ones included
    sent: int = 0
    refused: int = 0
    failed: int = 0  # rows that turned FAILED in this step
    held: int = 0  # held back behind an earlier row of their coupon (another relay's)


class EventPublisher:
    """Publishes a batch of events in order and tells which the broker confirmed.

    It owns its channel (:class:`flashclaim.core.broker.PublishingChannel`, the events
    exchange declared on it; opened by :meth:`open` or the first batch): after a batch the broker
    refused in part, the next goes out on a new channel, since RabbitMQ 3.10 can keep
    refusing a channel that a quorum queue once refused, and the refused events'
    retries would meet the same refusal.
    """

    def __init__(
        self, connection: AbstractRobustConnection, topology: Topology, per_message: int = 100
    ) -> None:
        self._connection = connection
        self._exchange = topology.events_exchange
        # Events a message at most (envelope 2, flashclaim/core/events.py); 1: envelope 1.
        self._per_message = per_message
        self._channel = broker.PublishingChannel(connection, topology.declare_events)

    @property
    def renewals(self) -> int:
        """Channels replaced after a refused batch."""
        return self._channel.renewals

    async def open(self) -> None:
        await self._channel.open()

    async def close(self) -> None:
        await self._channel.close()

    async def publish(self, events: Sequence[Event], timeout: float) -> list[bool]:
        """Whether each event was confirmed (``False``: the broker refused its message);
        raise ``DependencyUnavailable("broker")`` when the broker could not answer for all
        of them (not connected, connection lost, no confirm in time): nothing is the
        rows' fault."""
        if not broker.is_up(self._connection):
            raise DependencyUnavailable("broker", "not connected")
        batches = list(events_.messages(events, self._per_message))
        # A traced event is alone in its message (events_.messages): one span a message.
        spans = [self._span(b[0]) for b in batches] if tracing.enabled() else []
        try:
            confirmed = await self._publish(batches, spans, timeout)
        except BaseException as exc:  # cancellation too: the spans end, the error goes on
            for span in spans:
                if span is not None:
                    span.record_exception(exc)
                    span.set_status(tracing.StatusCode.ERROR, type(exc).__name__)
                    span.end()
            raise
        for span, ok in zip(spans, confirmed, strict=False):
            if span is not None:
                if not ok:
                    span.set_status(tracing.StatusCode.ERROR, "refused by the broker")
                span.end()
        if not all(confirmed):
            await self._channel.renew()
        return [ok for batch, ok in zip(batches, confirmed, strict=True) for _ in batch]

    def _span(self, event: Event) -> Span | None:
        """A span of the event's publish in the trace of its change (none if untraced)."""
        context = tracing.context_of(event.trace)
        if context is None:
            return None
        return tracing.tracer().start_span(
            f"{self._exchange} publish",
            context=context,
            kind=tracing.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "publish",
                "messaging.destination.name": self._exchange,
                "messaging.message.id": str(event.id),
                "flashclaim.event_type": event.type,
            },
        )

    @staticmethod
    def _headers(event: Event, span: Span | None) -> FieldTable | None:
        """The subscriber's ``traceparent``: the publish span's, or the change's."""
        if span is not None:
            carrier: dict[str, str] = {}
            tracing.inject(carrier, span)
            return dict(carrier)
        return {"traceparent": event.trace} if event.trace else None

    def _properties(
        self, batch: Sequence[Event], content_type: str, span: Span | None
    ) -> aiormq.spec.Basic.Properties:
        first = batch[0]
        return aiormq.spec.Basic.Properties(
            content_type=content_type,
            delivery_mode=2,
            message_id=str(first.id),
            message_type=first.type,
            app_id=APP_ID,
            timestamp=first.created_at,
            headers=self._headers(first, span),
        )

    async def _publish(
        self, batches: Sequence[Sequence[Event]], spans: Sequence[Span | None], timeout: float
    ) -> list[bool]:
        spans = spans or [None] * len(batches)
        bodies = [events_.envelope(batch, self._per_message) for batch in batches]
        try:
            # aio-pika's publish waits for each frame to be written before the next
            # (one event-loop turn per message); the channel underneath queues them all
            # at once, in call order (its lock is FIFO), and the confirms come back
            # together.
            opened, _ = await self._channel.open()
            channel = cast(aiormq.Channel, await opened.get_underlay_channel())
            async with asyncio.timeout(timeout):
                confirms = await asyncio.gather(
                    *(
                        channel.basic_publish(
                            body,
                            exchange=self._exchange,
                            routing_key=batch[0].type,
                            properties=self._properties(batch, content_type, span),
                            wait=False,
                        )
                        for batch, (content_type, body), span in zip(
                            batches, bodies, spans, strict=True
                        )
                    ),
                    return_exceptions=True,
                )
            # A nack (aiormq raises it as DeliveryError) refuses that message alone;
            # anything else failed the batch.
            for outcome in confirms:
                if isinstance(outcome, BaseException) and not isinstance(
                    outcome, aiormq.exceptions.DeliveryError
                ):
                    raise outcome
        except broker.AWAY as exc:
            raise DependencyUnavailable("broker", type(exc).__name__) from exc
        return [not isinstance(c, aiormq.exceptions.DeliveryError) for c in confirms]


@dataclass
class OutboxRelay:
    pool: AsyncConnectionPool
    publisher: EventPublisher
    policy: RelayPolicy
    metrics: RelayMetrics = field(default_factory=lambda: RelayMetrics(enabled=False))

    async def step(self) -> Step:
        """Publish one batch; what it took and what became of it."""
        started = time.perf_counter()
        # No span of a step, nor of its statements: a step serves many claims and is
        # none's. Each traced event's publish is a span of its own change's trace.
        with tracing.untraced():
            step = await self._step()
        if step.sent or step.refused:
            self.metrics.step_seconds.observe(time.perf_counter() - started)
            self.metrics.published.inc(step.sent)
            self.metrics.refused.inc(step.refused)
        return step

    async def sample(self) -> None:
        """The outbox's gauges (pending, failed, the oldest pending row's age)."""
        if not self.metrics.enabled:
            return
        async with self.pool.connection(timeout=2.0) as conn:
            cur = await conn.execute(queries()["outbox_stats"])
            row = await cur.fetchone()
        if row is not None:
            pending, failed, oldest, _ = row
            self.metrics.pending.set(pending)
            self.metrics.failed.set(failed)
            self.metrics.oldest_pending.set(oldest or 0.0)
        self.metrics.sample_pool(self.pool.get_stats())

    async def _step(self) -> Step:
        q = queries()
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(q["outbox_take"], {"limit": self.policy.batch_size})
            rows = await cur.fetchall()
            events = [Event(*row[:-1]) for row in rows if row[-1]]
            held = len(rows) - len(events)
            if not events:
                return Step(len(rows), held=held)
            confirmed = await self.publisher.publish(events, self.policy.publish_timeout)
            sent = [e.id for e, ok in zip(events, confirmed, strict=True) if ok]
            if self.metrics.enabled:
                now = dt.datetime.now(dt.UTC)
                for e, ok in zip(events, confirmed, strict=True):
                    if ok:
                        self.metrics.event_lag.observe((now - e.created_at).total_seconds())
            refused = [e.id for e, ok in zip(events, confirmed, strict=True) if not ok]
            async with conn.pipeline():
                if sent:
                    await conn.execute(
                        q["outbox_mark_sent"], {"ids": sent, "relay": self.policy.relay_id}
                    )
                if refused:
                    cur = await conn.execute(
                        q["outbox_mark_refused"],
                        {
                            "ids": refused,
                            "error": "refused by the broker (basic.nack)",
                            "max_attempts": self.policy.max_attempts,
                            "backoff": self.policy.retry_seconds,
                            "backoff_max": self.policy.retry_max_seconds,
                        },
                    )
            failed = 0
            if refused:
                failed = sum(1 for _, status, _ in await cur.fetchall() if status == "FAILED")
                log.warning(
                    "events refused by the broker",
                    extra={"refused": len(refused), "failed": failed},
                )
        return Step(len(rows), len(sent), len(refused), failed, held)

    async def prune(self, retention_seconds: float, chunk: int = 10_000) -> int:
        """Delete SENT rows older than the retention period; how many."""
        total = 0
        while True:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    queries()["outbox_prune"], {"retention": retention_seconds, "limit": chunk}
                )
                total += cur.rowcount
            if cur.rowcount < chunk:
                return total
