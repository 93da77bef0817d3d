"""The dead-letter format: what the consumer writes is what the operators' tools read."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractIncomingMessage

from flashclaim.core.deadletters import (
    REPLAYS,
    copy_of,
    failure_headers,
    properties_of,
    replay_headers,
)
from flashclaim.ops.deadletters import BadSelection, DeadLetter, Selection


@dataclass
class Delivered:
    """The fields of a delivered message that dead-lettering reads."""

    headers: dict[str, Any] = field(default_factory=lambda: {"x-delivery-count": 2, "k": "v"})
    exchange: str = "ns.claims"
    routing_key: str = "PROMO"
    message_id: str = "m-1"
    body: bytes = b'{"v": 1, "user_id": "alice", "coupon_name": "PROMO"}'
    content_type: str = "application/json"
    app_id: str = "flashclaim-gateway"
    type: str = "claim"
    reply_to: str = "ns:replies:g1"
    correlation_id: str | None = None
    timestamp: dt.datetime | None = None


def dead(message: Delivered, headers: dict[str, Any]) -> DeadLetter:
    incoming = cast(AbstractIncomingMessage, message)
    return DeadLetter(message.message_id, message.body, headers, properties_of(incoming))


def test_what_the_consumer_writes_is_what_operators_read() -> None:
    message = Delivered()
    incoming = cast(AbstractIncomingMessage, message)
    headers = failure_headers(incoming, "failed", ValueError("boom"), "consumer-1", attempts=5)
    letter = dead(message, headers)
    assert (letter.reason, letter.error_type, letter.error) == ("failed", "ValueError", "boom")
    assert letter.delivery_count == 5
    assert letter.origin == ("ns.claims", "PROMO")
    assert (letter.coupon, letter.user) == ("PROMO", "alice")
    assert letter.first_death is not None and letter.age_seconds() is not None
    assert headers["k"] == "v"  # the command's own headers are kept
    # Without a count from the inbox, the broker's delivery count plus this attempt.
    assert failure_headers(incoming, "poison", ValueError(), "c")["x-flashclaim-attempts"] == 3


def test_an_error_is_cut_at_2000_characters() -> None:
    incoming = cast(AbstractIncomingMessage, Delivered())
    headers = failure_headers(incoming, "failed", RuntimeError("x" * 5000), "c")
    assert len(headers["x-flashclaim-error"]) == 2000


def test_a_replay_starts_afresh_and_is_counted() -> None:
    message = Delivered()
    incoming = cast(AbstractIncomingMessage, message)
    headers = failure_headers(incoming, "failed", ValueError("boom"), "c", attempts=5)
    headers["x-death"] = [{"reason": "rejected", "count": 1}]
    headers["x-first-death-reason"] = "rejected"
    before = dt.datetime.now(dt.UTC)
    once = replay_headers(headers)
    replayed_at = dt.datetime.fromisoformat(once.pop("x-flashclaim-replayed-at"))
    assert before <= replayed_at <= dt.datetime.now(dt.UTC)
    assert once == {"k": "v", REPLAYS: 1}  # the failure's and the broker's headers gone
    again = replay_headers({**failure_headers(incoming, "failed", ValueError(), "c"), **once})
    once["x-flashclaim-replayed-at"] = replayed_at.isoformat()
    assert again[REPLAYS] == 2
    copy = copy_of(message.message_id, message.body, once, properties_of(incoming))
    assert (copy.message_id, copy.reply_to, copy.body) == ("m-1", message.reply_to, message.body)
    assert copy.delivery_mode == 2  # persistent


def test_a_broker_dead_letter_is_read_from_x_death() -> None:
    headers = {
        "x-death": [
            {
                "reason": "delivery_limit",
                "count": 1,
                "exchange": "ns.claims",
                "routing-keys": ["PROMO"],
                "time": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
            }
        ]
    }
    letter = dead(Delivered(headers={}), headers)
    assert (letter.reason, letter.origin) == ("delivery_limit", ("ns.claims", "PROMO"))
    assert letter.first_death == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"message_ids": "abc"}, "list of strings"),
        ({"message_ids": [1]}, "list of strings"),
        ({"reason": 5}, "'reason' must be a string"),
        ({"older_than": "nan"}, "finite"),
        ({"older_than": -1}, "finite"),
        ({"older_than": True}, "number of seconds"),
        ({"every": "yes"}, "'all'"),
        ({}, "name message ids"),
    ],
)
def test_a_selection_refuses_what_it_cannot_use(fields: dict[str, Any], complaint: str) -> None:
    with pytest.raises(BadSelection, match=complaint):
        Selection.of(**fields, required=True)


def test_a_selection_matches_by_every_field_given() -> None:
    letter = dead(
        Delivered(),
        failure_headers(cast(AbstractIncomingMessage, Delivered()), "poison", ValueError(), "c"),
    )
    assert Selection.of(reason="poison", coupon="PROMO").matches(letter)
    assert not Selection.of(reason="failed").matches(letter)
    assert not Selection.of(message_ids=["other"]).matches(letter)
    assert not Selection.of(older_than=3600).matches(letter)
    assert Selection.of(older_than="0").matches(letter)
    assert Selection.of().empty and not Selection.of(every=True).empty
