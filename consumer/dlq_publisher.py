"""Moving a command that cannot be applied to the dead-letter queue, with the reason.

The consumer publishes a copy to the dead-letter exchange with headers saying why
(``x-flashclaim-*``), waits for the broker's confirm, and only then acknowledges the
original: the command is in the work queue or in the DLQ at every moment, never in
neither. The publish is mandatory and its channel raises on a return: a copy that no
queue took (the DLQ or its binding is missing) is a failure, not a success. Then the
topology is declared again (which restores the DLQ) and the copy sent once more.

Two cases:

- a message that cannot even be decoded (:meth:`DeadLetterPublisher.send`) goes as it
  is; if the DLQ does not take it, it is rejected and the broker dead-letters it itself
  (``x-death`` reason ``rejected``), holding it under its at-least-once dead-letter
  strategy until the DLQ takes it;
- a claim (:meth:`DeadLetterPublisher.send_claim`), poison or failed for good, goes
  alone, as a message of its own, whether its message carries one claim or several; if
  the DLQ does not take it, the consumer requeues the message (consumer/worker.py).

Commands the broker dead-letters on its own (``x-death`` reason ``delivery_limit``)
carry only ``x-death``. The headers and the copy are built by
flashclaim/core/deadletters.py, which also reads them back for the operators.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from flashclaim.core.deadletters import copy_of, failure_headers, properties_of
from flashclaim.core.topology import CLAIM_ROUTING_KEY

log = logging.getLogger(__name__)


class DeadLetterPublisher:
    def __init__(
        self,
        exchange: AbstractExchange,
        service: str,
        repair: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """``exchange`` must be on a channel with publisher confirms and
        ``on_return_raises``; ``repair`` declares the topology again."""
        self._exchange = exchange
        self._service = service
        self._repair = repair

    async def send(
        self, message: AbstractIncomingMessage, reason: str, error: BaseException
    ) -> None:
        """Move ``message`` to the DLQ as it is, and settle it."""
        headers = failure_headers(message, reason, error, self._service)
        copy = copy_of(message.message_id, message.body, headers, properties_of(message))
        if await self._published(copy, message.message_id):
            await message.ack()
            self._logged({"message_id": message.message_id}, reason, error)
        else:
            await message.reject(requeue=False)

    async def send_claim(
        self,
        message: AbstractIncomingMessage,
        request_id: str | None,
        body: bytes,
        reason: str,
        error: BaseException,
        attempts: int | None = None,
    ) -> bool:
        """Dead-letter one claim of a message, alone (its ``request_id`` and version 1
        ``body``), with the carrying message's headers and properties; ``attempts`` are
        its failed attempts so far. The message itself is not settled here. ``False`` if
        the DLQ could not take it: the caller returns the whole message to its queue
        (its other claims are answered from the inbox when it comes back)."""
        headers = failure_headers(message, reason, error, self._service, attempts)
        copy = copy_of(request_id, body, headers, properties_of(message))
        if not await self._published(copy, request_id):
            return False
        self._logged({"request_id": request_id}, reason, error)
        return True

    async def _published(self, copy: aio_pika.Message, message_id: str | None) -> bool:
        """Publish ``copy`` to the DLQ, repairing the topology once if it is not taken."""
        try:
            await self._publish(copy)
        except Exception as exc:  # any failure to publish: repaired and sent once more
            if not await self._repaired(message_id, exc):
                return False
            try:
                await self._publish(copy)
            except Exception as again:  # as above: then the caller settles it otherwise
                log.error(
                    "dead-letter publish failed twice",
                    extra={"message_id": message_id, "error": repr(again)},
                )
                return False
        return True

    @staticmethod
    def _logged(which: dict[str, str | None], reason: str, error: BaseException) -> None:
        log.warning(
            "command dead-lettered",
            extra={
                **which,
                "reason": reason,
                "error_type": type(error).__name__,
                "error": str(error)[:500],
            },
        )

    async def _publish(self, copy: aio_pika.Message) -> None:
        # Raises on a nack, a timeout, and (on_return_raises) on a return: unroutable.
        await self._exchange.publish(copy, CLAIM_ROUTING_KEY, mandatory=True, timeout=10)

    async def _repaired(self, message_id: str | None, exc: BaseException) -> bool:
        log.error(
            "dead-letter publish failed; declaring the topology again",
            extra={"message_id": message_id, "error": repr(exc)},
        )
        if self._repair is None:
            return False
        try:
            await self._repair()
        except Exception as repair_exc:  # the copy is not sent: the caller settles it
            log.error("topology not declared", extra={"error": repr(repair_exc)})
            return False
        return True
