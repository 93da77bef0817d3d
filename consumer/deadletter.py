"""Moving a command that cannot be applied to the dead-letter queue, with the reason.

The consumer publishes a copy to the dead-letter exchange with headers saying why
(``x-flashclaim-*``), waits for the broker's confirm, and only then acknowledges the
original: the command is in the work queue or in the DLQ at every moment, never in
neither. If that publish fails, the original is rejected instead and the broker
dead-letters it itself (``x-death`` reason ``rejected``). Commands the broker
dead-letters on its own (``x-death`` reason ``delivery_limit``) carry only ``x-death``.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from flashclaim.topology import CLAIM_ROUTING_KEY

log = logging.getLogger(__name__)

HEADER_PREFIX = "x-flashclaim-"


def delivery_count(message: AbstractIncomingMessage) -> int:
    """Earlier deliveries of this message, as counted by the broker (quorum queues)."""
    value = (message.headers or {}).get("x-delivery-count", 0)
    return value if isinstance(value, int) else 0


class DeadLetterer:
    def __init__(self, exchange: AbstractExchange, service: str) -> None:
        self._exchange = exchange
        self._service = service

    async def send(
        self, message: AbstractIncomingMessage, reason: str, error: BaseException
    ) -> None:
        headers: dict[str, Any] = dict(message.headers or {})
        headers.update(
            {
                f"{HEADER_PREFIX}reason": reason,
                f"{HEADER_PREFIX}error-type": type(error).__name__,
                f"{HEADER_PREFIX}error": str(error)[:2000],
                f"{HEADER_PREFIX}service": self._service,
                f"{HEADER_PREFIX}failed-at": dt.datetime.now(dt.UTC).isoformat(),
                f"{HEADER_PREFIX}attempts": delivery_count(message) + 1,
                f"{HEADER_PREFIX}original-exchange": message.exchange or "",
                f"{HEADER_PREFIX}original-routing-key": message.routing_key or "",
            }
        )
        copy = aio_pika.Message(
            message.body,
            headers=headers,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            content_type=message.content_type,
            app_id=message.app_id,
            type=message.type,
            timestamp=message.timestamp,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await self._exchange.publish(copy, CLAIM_ROUTING_KEY, mandatory=True, timeout=10)
        except Exception as exc:
            log.error(
                "dead-letter publish failed; rejecting instead",
                extra={"message_id": message.message_id, "error": repr(exc)},
            )
            await message.reject(requeue=False)
            return
        await message.ack()
        log.warning(
            "command dead-lettered",
            extra={
                "message_id": message.message_id,
                "reason": reason,
                "error_type": type(error).__name__,
                "error": str(error)[:500],
            },
        )
