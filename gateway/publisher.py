"""Publishing claim commands to RabbitMQ with publisher confirms."""

from __future__ import annotations

import datetime as dt

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, DeliveryError

from flashclaim.errors import DependencyUnavailable
from flashclaim.messages import CLAIM_EVENT, ClaimCommand
from flashclaim.topology import CLAIM_ROUTING_KEY


class ClaimPublisher:
    def __init__(self, exchange: AbstractExchange, timeout: float) -> None:
        self._exchange = exchange
        self._timeout = timeout

    async def publish(self, command: ClaimCommand) -> None:
        """Return once the broker has confirmed the command as stored.

        Raises :class:`DependencyUnavailable` when the broker refuses it (nack, queue
        full, unroutable) or does not confirm in time; the caller answers 503.
        """
        message = aio_pika.Message(
            command.body(),
            message_id=str(command.request_id),
            reply_to=command.reply_to,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            app_id="flashclaim-gateway",
            type=CLAIM_EVENT,
            timestamp=dt.datetime.now(dt.UTC),
        )
        try:
            confirmation = await self._exchange.publish(
                message, CLAIM_ROUTING_KEY, mandatory=True, timeout=self._timeout
            )
        except (
            AMQPError,
            aiormq.exceptions.AMQPError,
            ChannelInvalidStateError,
            ConnectionError,
            TimeoutError,
            RuntimeError,
        ) as exc:
            raise DependencyUnavailable("broker", type(exc).__name__) from exc
        if isinstance(confirmation, aiormq.spec.Basic.Nack | aiormq.spec.Basic.Return):
            raise DependencyUnavailable("broker", "claim not accepted by the broker")
        if isinstance(confirmation, DeliveryError):  # pragma: no cover - defensive
            raise DependencyUnavailable("broker", "claim not routed")
