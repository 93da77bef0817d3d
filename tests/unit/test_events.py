"""The events of a batch, and their published form."""

from __future__ import annotations

import datetime as dt
import uuid

import orjson
import pytest

from flashclaim.core.events import (
    BATCH_CONTENT_TYPE,
    CLAIMED,
    CREATED,
    SINGLE_CONTENT_TYPE,
    SOLD_OUT,
    Coupon,
    Event,
    batch_events,
    decode,
    envelope,
    messages,
)
from flashclaim.core.messages import ClaimCommand


def claim(user: str, coupon: str) -> ClaimCommand:
    return ClaimCommand(uuid.uuid4(), user, coupon)


def test_each_grant_tells_the_stock_it_left_and_a_coupon_taken_to_zero_sells_out_once() -> None:
    granted = [claim("a", "X"), claim("b", "Y"), claim("c", "X")]
    rows = batch_events({"X": Coupon(10, 2), "Y": Coupon(5, 5)}, granted)
    assert [(r["aggregate"], r["event_type"], r["payload"]["remaining_amount"]) for r in rows] == [
        ("X", CLAIMED, 1),
        ("Y", CLAIMED, 4),
        ("X", CLAIMED, 0),
        ("X", SOLD_OUT, 0),
    ]
    assert rows[0]["payload"] == {
        "user_id": "a",
        "request_id": str(granted[0].request_id),
        "remaining_amount": 1,
    }
    assert rows[3]["payload"] == {"amount": 10, "remaining_amount": 0}


def test_no_grant_no_event() -> None:
    assert batch_events({"X": Coupon(1, 0)}, []) == []


def test_the_published_event_has_the_common_fields_and_its_own() -> None:
    event = Event(
        uuid.uuid4(),
        42,
        "X",
        CLAIMED,
        {"user_id": "a", "request_id": "r", "remaining_amount": 3},
        dt.datetime(2026, 12, 1, 9, 30, tzinfo=dt.UTC),
    )
    assert orjson.loads(event.body()) == {
        "event_id": str(event.id),
        "type": "coupon.claimed",
        "version": 1,
        "occurred_at": "2026-12-01T09:30:00+00:00",
        "coupon_name": "X",
        "sequence": 42,
        "user_id": "a",
        "request_id": "r",
        "remaining_amount": 3,
    }


def test_events_keep_the_trace_of_the_claim_that_caused_them() -> None:
    a = ClaimCommand(uuid.uuid4(), "a", "X", trace="00-" + "a" * 32 + "-" + "1" * 16 + "-01")
    b = ClaimCommand(uuid.uuid4(), "b", "X", trace="00-" + "b" * 32 + "-" + "2" * 16 + "-01")
    rows = batch_events({"X": Coupon(2, 2)}, [a, b])
    # Each grant in its claim's trace; the sell-out in the trace of the last one.
    assert [r["traceparent"] for r in rows] == [a.trace, b.trace, b.trace]


def event(seq: int, type_: str = CLAIMED, trace: str | None = None) -> Event:
    return Event(
        uuid.uuid4(), seq, "X", type_, {"remaining_amount": 1}, dt.datetime.now(dt.UTC), trace
    )


def test_runs_of_one_type_share_a_message_in_order() -> None:
    created = Event(uuid.uuid4(), 1, "X", CREATED, {"amount": 9}, dt.datetime.now(dt.UTC))
    events = [created, *(event(i) for i in range(2, 7)), event(7, SOLD_OUT)]
    cut = list(messages(events, per_message=3))
    assert [[e.seq for e in m] for m in cut] == [[1], [2, 3, 4], [5, 6], [7]]
    assert [e for m in cut for e in m] == events
    assert [len(m) for m in messages(events, per_message=1)] == [1] * 7


def test_a_traced_event_travels_alone() -> None:
    trace = "00-" + "a" * 32 + "-" + "1" * 16 + "-01"
    events = [event(1), event(2, trace=trace), event(3), event(4)]
    assert [[e.seq for e in m] for m in messages(events, 100)] == [[1], [2], [3, 4]]


def test_both_envelopes_decode_to_the_same_documents() -> None:
    events = [event(1), event(2)]
    content_type, batch = envelope(events, 100)
    assert content_type == BATCH_CONTENT_TYPE
    assert decode(content_type, batch) == [orjson.loads(e.body()) for e in events]
    # Envelope 2 even for one event, unless one event a message is asked for.
    assert envelope(events[:1], 100) == (BATCH_CONTENT_TYPE, b"[" + events[0].body() + b"]")
    content_type, single = envelope(events[:1], 1)
    assert (content_type, single) == (SINGLE_CONTENT_TYPE, events[0].body())
    assert decode(content_type, single) == [orjson.loads(single)]
    for content_type, body in (
        (BATCH_CONTENT_TYPE, b'{"event_id": "x"}'),
        (BATCH_CONTENT_TYPE, b"[1, 2]"),
        (SINGLE_CONTENT_TYPE, b"[]"),
        (SINGLE_CONTENT_TYPE, b"not json"),
    ):
        with pytest.raises(ValueError):
            decode(content_type, body)
