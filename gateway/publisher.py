"""Publishing claim commands to RabbitMQ with publisher confirms, behind a circuit breaker."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Sequence
from typing import cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractRobustConnection,
    HeadersType,
)
from circuitbreaker import CircuitBreaker

from flashclaim.core import broker, tracing
from flashclaim.core.errors import DependencyUnavailable
from flashclaim.core.messages import CLAIM_EVENT, ClaimCommand, encode_claims
from flashclaim.core.metrics import GatewayMetrics
from flashclaim.core.topology import Topology


class ClaimPublisher:
    """Publishes a claim and returns only once the broker has stored it.

    While the broker is away, requests must not pile up waiting for confirms that
    cannot come: when the connection is down, or after ``failure_threshold`` failed
    publishes in a row (the breaker opens for ``recovery_seconds``), the publisher
    refuses at once and the client gets 503 with a Retry-After.

    The publisher owns its channel (:meth:`open`, :meth:`close`), which is replaced
    after the broker refuses a claim (:class:`flashclaim.core.broker.PublishingChannel`:
    a quorum queue that lost its leader, or a command queue full: past
    ``FLASHCLAIM_COMMAND_QUEUE_MAX_BYTES`` the broker refuses, and the claim is answered
    503 with a Retry-After).
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        topology: Topology,
        timeout: float,
        failure_threshold: int,
        recovery_seconds: float,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._metrics = metrics or GatewayMetrics(enabled=False)
        self._connection = connection
        self._topology = topology

        async def commands(channel: AbstractChannel) -> AbstractExchange:
            return (await topology.declare(channel)).commands

        # on_return_raises: a claim no queue took (no binding) is not accepted.
        self._channel = broker.PublishingChannel(connection, commands, on_return_raises=True)
        self._timeout = timeout
        self._breaker = CircuitBreaker(
            failure_threshold=failure_threshold,
            recovery_timeout=recovery_seconds,
            expected_exception=DependencyUnavailable,
            name="broker",
        )

    async def open(self) -> None:
        """Open the channel (and declare the topology, a no-op if it exists)."""
        await self._channel.open()

    async def close(self) -> None:
        await self._channel.close()

    async def publish(self, commands: Sequence[ClaimCommand]) -> None:
        """Publish ``commands`` (claims of one coupon, with one reply channel) as one
        message; raise :class:`DependencyUnavailable` unless the broker confirmed it."""
        self.check()
        started = time.perf_counter()
        await self._breaker.call_async(self._publish, commands)
        self._metrics.published(time.perf_counter() - started, len(commands))

    def check(self) -> None:
        """Raise :class:`DependencyUnavailable` if a publish now would be refused at once:
        the connection is down, or the breaker open."""
        # Refuse at once (503) rather than wait for a confirm that cannot come.
        if not broker.is_up(self._connection):
            self._metrics.publish_failures.labels("not_connected").inc()
            raise DependencyUnavailable("broker", "not connected")
        # circuitbreaker checks the state only in its decorator, not in call_async:
        # refuse here while it is open (half-open lets one publish through to probe).
        if self._breaker.opened:
            self._metrics.publish_failures.labels("circuit_open").inc()
            wait = math.ceil(max(self._breaker.open_remaining, 1))
            raise DependencyUnavailable("broker", "circuit open", retry_after=wait)

    @property
    def breaker_open(self) -> bool:
        return bool(self._breaker.opened)

    async def _publish(self, commands: Sequence[ClaimCommand]) -> None:
        traced = (tracing.context_of(c.trace) for c in commands if c.trace)
        contexts = [c for c in traced if c is not None]
        if not contexts:  # no claim of it is traced (or tracing is off)
            return await self._send(commands)
        # A child of the first traced claim's trace, linked to every traced claim.
        with tracing.tracer().start_as_current_span(
            f"{self._topology.commands_exchange} publish",
            context=contexts[0],
            kind=tracing.SpanKind.PRODUCER,
            links=tracing.links(contexts),
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "publish",
                "messaging.destination.name": self._topology.commands_exchange,
                "messaging.batch.message_count": len(commands),
            },
        ):
            await self._send(commands)

    async def _send(self, commands: Sequence[ClaimCommand]) -> None:
        message_id, body = encode_claims(commands)
        # One claim: its trace in the standard header (several: in each claim).
        headers: HeadersType | None = None
        if len(commands) == 1 and commands[0].trace:
            headers = {"traceparent": commands[0].trace}
        message = aio_pika.Message(
            body,
            message_id=message_id,
            reply_to=commands[0].reply_to,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            app_id="flashclaim-gateway",
            headers=headers,
            type=CLAIM_EVENT,
            timestamp=dt.datetime.now(dt.UTC),
        )
        current = self._channel.current
        if current is None:
            raise DependencyUnavailable("broker", "publisher not open")
        channel, exchange = current
        try:
            # Not aio-pika's Exchange.publish: it holds the channel's lock until the
            # frames are written out (aiormq's basic_publish with wait=True), so a
            # process's publishes go one at a time, a few turns of the event loop each.
            # When claims are spread over many coupons (a message each) and the loop is
            # busy, they queued behind that lock for seconds. With wait=False the lock
            # covers only handing the frames to the connection's writer; each publish
            # still waits for its own confirm (or nack, or return).
            # aiormq's abstract channel does not declare ``wait``; its channel has it.
            underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
            confirmation = await underlay.basic_publish(
                message.body,
                exchange=exchange.name,
                # Hashed by the exchange: one coupon, one partition.
                routing_key=commands[0].coupon_name,
                properties=message.properties,
                mandatory=True,
                timeout=self._timeout,
                wait=False,
            )
        except aiormq.exceptions.DeliveryError as exc:  # a nack, or returned (no queue)
            self._metrics.publish_failures.labels("refused").inc()
            self._channel.refused()
            raise DependencyUnavailable("broker", "claim not accepted by the broker") from exc
        except broker.AWAY as exc:
            self._metrics.publish_failures.labels("broker_error").inc()
            raise DependencyUnavailable("broker", type(exc).__name__) from exc
        if isinstance(confirmation, aiormq.spec.Basic.Nack | aiormq.spec.Basic.Return):
            self._metrics.publish_failures.labels("refused").inc()
            self._channel.refused()
            raise DependencyUnavailable("broker", "claim not accepted by the broker")
