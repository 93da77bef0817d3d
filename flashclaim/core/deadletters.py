"""Dead letters' format: what the consumer writes when it moves a command to the DLQ.

The ``x-flashclaim-*`` headers (``failure_headers``, written by consumer/dlq_publisher.py)
are the ones the operators' tools read back (flashclaim/ops/deadletters.py), and a
replay's fresh start (``replay_headers``) is decided here too; the outgoing copy of a
command is built in one place (``copy_of``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

# The header contract. Written by the consumer when it dead-letters a command:
HEADER = "x-flashclaim-"
REASON = f"{HEADER}reason"  # poison | failed (the broker's own: x-death reason)
ERROR_TYPE = f"{HEADER}error-type"
ERROR = f"{HEADER}error"  # at most 2,000 characters
SERVICE = f"{HEADER}service"  # the consumer instance
FAILED_AT = f"{HEADER}failed-at"  # ISO 8601, UTC
ATTEMPTS = f"{HEADER}attempts"  # failed attempts so far
ORIGINAL_EXCHANGE = f"{HEADER}original-exchange"
ORIGINAL_ROUTING_KEY = f"{HEADER}original-routing-key"
# Written by a replay, on the republished command:
REPLAYS = f"{HEADER}replays"
REPLAYED_AT = f"{HEADER}replayed-at"
# The broker's own, dropped on a replay (a fresh start):
_BROKER_HEADERS = ("x-death", "x-delivery-count")
_BROKER_PREFIXES = ("x-first-death", "x-last-death")


def delivery_count(message: AbstractIncomingMessage) -> int:
    """Earlier deliveries of this message, as counted by the broker (quorum queues)."""
    value = (message.headers or {}).get("x-delivery-count", 0)
    return value if isinstance(value, int) else 0


def failure_headers(
    message: AbstractIncomingMessage,
    reason: str,
    error: BaseException,
    service: str,
    attempts: int | None = None,
) -> dict[str, Any]:
    """The message's headers plus why it is dead-lettered; ``attempts`` are its failed
    attempts so far (default: the broker's delivery count, plus this one)."""
    headers: dict[str, Any] = dict(message.headers or {})
    headers.update(
        {
            REASON: reason,
            ERROR_TYPE: type(error).__name__,
            ERROR: str(error)[:2000],
            SERVICE: service,
            FAILED_AT: dt.datetime.now(dt.UTC).isoformat(),
            ATTEMPTS: attempts if attempts is not None else delivery_count(message) + 1,
            ORIGINAL_EXCHANGE: message.exchange or "",
            ORIGINAL_ROUTING_KEY: message.routing_key or "",
        }
    )
    return headers


def replay_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """A fresh start for a replayed command: no death history and no attempt count, and
    the replay recorded."""
    fresh = {
        k: v
        for k, v in headers.items()
        if not (k.startswith(HEADER) or k in _BROKER_HEADERS or k.startswith(_BROKER_PREFIXES))
    }
    replays = headers.get(REPLAYS)
    fresh[REPLAYS] = (replays if isinstance(replays, int) else 0) + 1
    fresh[REPLAYED_AT] = dt.datetime.now(dt.UTC).isoformat()
    return fresh


def copy_of(
    message_id: str | None, body: bytes, headers: dict[str, Any], properties: dict[str, Any]
) -> aio_pika.Message:
    """A persistent copy of a command, with the given headers and its properties."""
    return aio_pika.Message(
        body,
        headers=headers,
        message_id=message_id or None,
        correlation_id=properties.get("correlation_id"),
        reply_to=properties.get("reply_to"),
        content_type=properties.get("content_type"),
        app_id=properties.get("app_id"),
        type=properties.get("type"),
        timestamp=properties.get("timestamp"),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def properties_of(message: AbstractIncomingMessage) -> dict[str, Any]:
    return {
        "content_type": message.content_type,
        "app_id": message.app_id,
        "type": message.type,
        "reply_to": message.reply_to,
        "correlation_id": message.correlation_id,
        "timestamp": message.timestamp,
    }
