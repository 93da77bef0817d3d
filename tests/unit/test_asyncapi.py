"""The events' AsyncAPI description (docs/asyncapi.json) describes what the code publishes:
a message for each event type in each envelope, and each document the code builds valid
against its type's schema (and an incomplete one not)."""

from __future__ import annotations

import datetime as dt
import uuid

import jsonschema
import orjson
import pytest

from flashclaim.core.events import TYPES, Coupon, Event, batch_events, envelope
from flashclaim.core.messages import ClaimCommand
from tests.asyncapi import check_message, described, document


def events_of_a_sale() -> list[Event]:
    rows = batch_events(
        {"X": Coupon(2, 2)},
        [ClaimCommand(uuid.uuid4(), "a", "X"), ClaimCommand(uuid.uuid4(), "b", "X")],
    )
    created = {
        "aggregate": "X",
        "event_type": "coupon.created",
        "payload": {"amount": 2, "remaining_amount": 2},
    }  # as the coupon's insert writes it
    now = dt.datetime.now(dt.UTC)
    return [
        Event(uuid.uuid4(), seq, row["aggregate"], row["event_type"], row["payload"], now)
        for seq, row in enumerate([created, *rows], start=1)
    ]


def test_the_description_is_asyncapi_3_with_a_message_per_type_and_envelope() -> None:
    assert document()["asyncapi"].startswith("3.")
    for event_type in TYPES:
        described(event_type, "application/json")
        described(event_type, "application/vnd.flashclaim.events.v2+json")


@pytest.mark.parametrize("per_message", [1, 100])
def test_every_message_the_relay_would_publish_is_described_and_valid(per_message: int) -> None:
    events = events_of_a_sale()
    assert [e.type for e in events] == [
        "coupon.created",
        "coupon.claimed",
        "coupon.claimed",
        "coupon.sold_out",
    ]
    for event in events:
        cut = [event] if per_message == 1 else [e for e in events if e.type == event.type]
        content_type, body = envelope(cut, per_message)
        check_message(event.type, content_type, body)


def test_a_document_without_a_field_of_its_type_is_refused() -> None:
    claimed = next(e for e in events_of_a_sale() if e.type == "coupon.claimed")
    document_ = orjson.loads(claimed.body())
    del document_["request_id"]
    with pytest.raises(jsonschema.ValidationError):
        check_message("coupon.claimed", "application/json", orjson.dumps(document_))
    with pytest.raises(AssertionError):
        check_message("coupon.claimed", "text/plain", claimed.body())
