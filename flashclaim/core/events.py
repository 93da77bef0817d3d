"""The events flashclaim announces to other systems, with no I/O.

Each change others must hear about is an outbox row written in the transaction of the
change (the consumer's batch, the coupon's creation); the relay publishes it to the
topic exchange ``<namespace>.events`` with the event type as its routing key. A
published event (JSON, version 1)::

    {"event_id": "…", "type": "coupon.claimed", "version": 1,
     "occurred_at": "2026-12-01T09:30:00.123456+00:00", "coupon_name": "PROMO_SUPER",
     "sequence": 1042, "user_id": "user_12345", "request_id": "…", "remaining_amount": 99}

- ``coupon.created``: ``amount``, ``remaining_amount`` (= amount);
- ``coupon.claimed``: ``user_id``, ``request_id`` (the claim's), ``remaining_amount``
  (the stock this grant left);
- ``coupon.sold_out``: ``amount``, ``remaining_amount`` (0). Written once, by the
  transaction whose grants take the stock to 0 (stock never goes up again).

``sequence`` increases in commit order within a coupon: a coupon's rows are written under
its row lock, so one transaction's rows come after the previous one's.

The message around the events (the envelope) is versioned apart from them:

- envelope 1: one event a message, the document itself (``content_type``
  ``application/json``, ``message_id`` = its ``event_id``);
- envelope 2 (the default): a run of events of one type, consecutive in publish order, in
  one message whose body is their documents as a JSON array (``content_type``
  :data:`BATCH_CONTENT_TYPE`, ``message_id`` = the first one's ``event_id``). One AMQP
  message, framed and confirmed once, carries up to ``OUTBOX_EVENTS_PER_MESSAGE`` of
  them; a traced event travels alone, its trace in the message's headers.

Either way the routing key is the events' type, so a queue bound to one type gets only
that type, and a coupon's events keep their order across messages. :func:`decode` reads
both.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from flashclaim.core.messages import ClaimCommand, uuid_text

VERSION = 1
# The media type of envelope 2, a JSON array of event documents.
BATCH_CONTENT_TYPE = "application/vnd.flashclaim.events.v2+json"
SINGLE_CONTENT_TYPE = "application/json"
CREATED = "coupon.created"
CLAIMED = "coupon.claimed"
SOLD_OUT = "coupon.sold_out"
TYPES = (CREATED, CLAIMED, SOLD_OUT)
# The PostgreSQL channel the outbox trigger notifies (migration 0003).
NOTIFY_CHANNEL = "flashclaim_outbox"


@dataclass(frozen=True, slots=True)
class Coupon:
    """What the batch read of a coupon under its lock."""

    amount: int
    remaining: int


def batch_events(
    coupons: Mapping[str, Coupon], granted: Sequence[ClaimCommand]
) -> list[dict[str, Any]]:
    """The outbox rows of one batch whose ``granted`` claims (in decision order) were
    decided against ``coupons``: one ``coupon.claimed`` per grant, with the stock it
    left, then one ``coupon.sold_out`` for each coupon the batch took to 0."""
    taken: Counter[str] = Counter()
    last: dict[str, ClaimCommand] = {}
    rows: list[dict[str, Any]] = []
    for claim in granted:
        taken[claim.coupon_name] += 1
        last[claim.coupon_name] = claim
        rows.append(
            {
                "aggregate": claim.coupon_name,
                "event_type": CLAIMED,
                "payload": {
                    "user_id": claim.user_id,
                    "request_id": uuid_text(claim.request_id),
                    "remaining_amount": coupons[claim.coupon_name].remaining
                    - taken[claim.coupon_name],
                },
                # The claim's trace: the event's publish is a span of it (relay/).
                "traceparent": claim.trace,
            }
        )
    for name, count in taken.items():
        coupon = coupons[name]
        if coupon.remaining - count == 0:
            rows.append(
                {
                    "aggregate": name,
                    "event_type": SOLD_OUT,
                    "payload": {"amount": coupon.amount, "remaining_amount": 0},
                    # In the trace of the claim that took the last one.
                    "traceparent": last[name].trace,
                }
            )
    return rows


@dataclass(frozen=True, slots=True)
class Event:
    """An outbox row as the relay reads it."""

    id: uuid.UUID
    seq: int
    aggregate: str
    type: str
    payload: Mapping[str, Any]
    created_at: dt.datetime
    # The W3C traceparent of the change's trace, when it was traced.
    trace: str | None = None

    def body(self) -> bytes:
        """The published JSON document."""
        return orjson.dumps(
            {
                "event_id": self.id,  # orjson writes a UUID's canonical text
                "type": self.type,
                "version": VERSION,
                "occurred_at": self.created_at.isoformat(),
                "coupon_name": self.aggregate,
                "sequence": self.seq,
                **self.payload,
            }
        )


def messages(events: Sequence[Event], per_message: int) -> Iterator[Sequence[Event]]:
    """The events of one publish, in order, cut into messages: runs of one type of at
    most ``per_message`` events; a traced event alone (its message carries its trace).
    Joined back in order, the messages are ``events``: nothing is reordered."""
    start = 0
    for i, event in enumerate(events):
        run = i - start
        if i > start and (
            run == per_message
            or event.type != events[start].type
            or event.trace is not None
            or events[start].trace is not None
        ):
            yield events[start:i]
            start = i
    if start < len(events):
        yield events[start:]


def envelope(events: Sequence[Event], per_message: int) -> tuple[str, bytes]:
    """``(content_type, body)`` of one message of ``events`` (cut by :func:`messages`
    with the same ``per_message``): envelope 2's JSON array, or with ``per_message`` 1,
    envelope 1's lone document."""
    if per_message == 1:
        (event,) = events
        return SINGLE_CONTENT_TYPE, event.body()
    return BATCH_CONTENT_TYPE, b"[" + b",".join(e.body() for e in events) + b"]"


def decode(content_type: str | None, body: bytes) -> list[dict[str, Any]]:
    """The event documents of one published message, whichever its envelope; a
    ``ValueError`` for a body that is neither."""
    document = orjson.loads(body)  # orjson.JSONDecodeError is a ValueError
    if content_type == BATCH_CONTENT_TYPE:
        if not isinstance(document, list) or not all(isinstance(e, dict) for e in document):
            raise ValueError("an event batch is a JSON array of event documents")
        return document
    if not isinstance(document, dict):
        raise ValueError("an event is a JSON object")
    return [document]
