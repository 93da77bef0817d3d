from __future__ import annotations

import uuid

import orjson
import pytest

from flashclaim.core.errors import PoisonMessage
from flashclaim.core.messages import ClaimCommand, ClaimResult, Outcome


def test_command_round_trips() -> None:
    command = ClaimCommand(uuid.uuid4(), "user_1", "PROMO", "replies:gw")
    decoded = ClaimCommand.decode(str(command.request_id), command.body(), "replies:gw")
    assert decoded == command


@pytest.mark.parametrize(
    ("message_id", "body", "reason"),
    [
        ("not-a-uuid", b'{"v":1,"user_id":"u","coupon_name":"c"}', "not a UUID"),
        (None, b'{"v":1,"user_id":"u","coupon_name":"c"}', "not a UUID"),
        (str(uuid.uuid4()), b"{oops", "not JSON"),
        (str(uuid.uuid4()), b"[1, 2]", "not a JSON object"),
        (str(uuid.uuid4()), b'{"v":2,"user_id":"u","coupon_name":"c"}', "version"),
        (str(uuid.uuid4()), b'{"v":1,"user_id":"","coupon_name":"c"}', "user_id"),
        (str(uuid.uuid4()), b'{"v":1,"user_id":"u","coupon_name":7}', "coupon_name"),
    ],
)
def test_poison_commands_are_recognised(message_id: str | None, body: bytes, reason: str) -> None:
    with pytest.raises(PoisonMessage, match=reason):
        ClaimCommand.decode(message_id, body, None)


def test_result_bodies_follow_the_contract() -> None:
    command = ClaimCommand(uuid.uuid4(), "u", "c")
    ok = ClaimResult.of(command, Outcome.CLAIMED)
    assert (ok.status, ok.body["status"]) == (200, "claimed")
    assert ok.body["request_id"] == str(command.request_id)
    sold_out = ClaimResult.of(command, Outcome.OUT_OF_STOCK)
    assert sold_out.status == 400
    assert sold_out.body["code"] == "out_of_stock"
    assert sold_out.body["error"]
    assert ClaimResult.loads(sold_out.dumps()) == sold_out
    assert orjson.loads(sold_out.dumps())["status"] == 400


@pytest.mark.parametrize("outcome", list(Outcome))
def test_a_result_keeps_its_outcome_through_redis_and_the_inbox(outcome: Outcome) -> None:
    command = ClaimCommand(uuid.uuid4(), "alice", "PROMO")
    result = ClaimResult.of(command, outcome)
    assert ClaimResult.loads(result.dumps()) == result
    assert ClaimResult.of_answer(command.request_id, result.status, result.body) == result
    common = {"user_id": "alice", "coupon_name": "PROMO", "request_id": str(command.request_id)}
    if outcome is Outcome.CLAIMED:
        assert (result.status, result.body) == (200, {"status": "claimed", **common})
    else:
        assert result.body == {"error": outcome.message, "code": outcome.code, **common}


def test_an_answer_that_is_no_outcome_is_refused() -> None:
    with pytest.raises(ValueError, match="not a claim answer"):
        ClaimResult.of_answer(uuid.uuid4(), 200, {"code": "out_of_stock"})
