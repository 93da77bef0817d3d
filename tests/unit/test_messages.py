from __future__ import annotations

import uuid

import orjson
import pytest

from flashclaim.core.errors import PoisonMessage
from flashclaim.core.messages import (
    ClaimCommand,
    ClaimResult,
    Outcome,
    decode_claims,
    dumps,
    encode_claims,
)
from gateway import http_answers as answers


def test_command_round_trips() -> None:
    command = ClaimCommand(uuid.uuid4(), "user_1", "PROMO", "replies:gw")
    decoded = decode_claims(str(command.request_id), command.body(), "replies:gw")
    assert decoded.commands == [command] and decoded.poison == []


@pytest.mark.parametrize(
    ("message_id", "body", "reason"),
    [
        ("not-a-uuid", b'{"v":1,"user_id":"u","coupon_name":"c"}', "not a UUID"),
        (None, b'{"v":1,"user_id":"u","coupon_name":"c"}', "not a UUID"),
        (str(uuid.uuid4()), b"{oops", "not JSON"),
        (str(uuid.uuid4()), b"[1, 2]", "not a JSON object"),
        (str(uuid.uuid4()), b'{"v":3,"user_id":"u","coupon_name":"c"}', "version"),
        (str(uuid.uuid4()), b'{"v":2,"user_id":"u","coupon_name":"c"}', "claims"),
        (str(uuid.uuid4()), b'{"v":1,"user_id":"","coupon_name":"c"}', "user_id"),
        (str(uuid.uuid4()), b'{"v":1,"user_id":"u","coupon_name":7}', "coupon_name"),
    ],
)
def test_poison_commands_are_recognised(message_id: str | None, body: bytes, reason: str) -> None:
    with pytest.raises(PoisonMessage, match=reason):
        decode_claims(message_id, body, None)


def test_result_bodies_follow_the_contract() -> None:
    command = ClaimCommand(uuid.uuid4(), "u", "c")
    ok = ClaimResult.of(command, Outcome.CLAIMED)
    assert (answers.status(ok), answers.body(ok)["status"]) == (200, "claimed")
    assert answers.body(ok)["request_id"] == str(command.request_id)
    sold_out = ClaimResult.of(command, Outcome.OUT_OF_STOCK)
    assert answers.status(sold_out) == 400
    assert answers.body(sold_out)["code"] == "out_of_stock"
    assert answers.body(sold_out)["error"]
    assert {answers.status(ClaimResult.of(command, o)) for o in Outcome} == {200, 400, 404, 409}


@pytest.mark.parametrize("outcome", list(Outcome))
def test_a_result_is_stored_as_its_outcome_not_as_an_http_answer(outcome: Outcome) -> None:
    command = ClaimCommand(uuid.uuid4(), "alice", "PROMO")
    result = ClaimResult.of(command, outcome, remaining=3)
    stored = orjson.loads(result.dumps())
    assert stored == {
        "request_id": str(command.request_id),
        "outcome": outcome.code,
        "user_id": "alice",
        "coupon_name": "PROMO",
        "remaining": 3,
    }
    assert ClaimResult.loads(result.dumps()) == result
    assert ClaimResult.loads(result.dumps()).remaining == 3


@pytest.mark.parametrize("outcome", list(Outcome))
def test_a_result_stored_as_an_http_answer_by_the_release_before_is_read(
    outcome: Outcome,
) -> None:
    """Redis keeps such values for RESULT_TTL_SECONDS after the upgrade."""
    command = ClaimCommand(uuid.uuid4(), "alice", "PROMO")
    result = ClaimResult.of(command, outcome)
    older = {
        "request_id": str(command.request_id),
        "status": answers.status(result),
        "body": answers.body(result),
    }
    assert ClaimResult.loads(orjson.dumps(older)) == result
    assert ClaimResult.loads_many(orjson.dumps([older, orjson.loads(result.dumps())])) == [
        result,
        result,
    ]


def test_a_value_that_is_no_outcome_is_refused() -> None:
    with pytest.raises(ValueError, match="not a claim outcome"):
        ClaimResult.from_dict({"request_id": str(uuid.uuid4()), "outcome": "maybe"})
    with pytest.raises(ValueError, match="not a claim answer"):
        ClaimResult.from_dict({"request_id": str(uuid.uuid4()), "status": 200, "body": {}})


def test_several_claims_travel_in_one_message_and_decode_one_by_one() -> None:
    commands = [ClaimCommand(uuid.uuid4(), f"user_{i}", "PROMO", "replies:gw") for i in range(3)]
    message_id, body = encode_claims(commands)
    assert orjson.loads(body)["v"] == 2
    decoded = decode_claims(message_id, body, "replies:gw")
    assert decoded.commands == commands and decoded.poison == []


def test_one_claim_travels_as_version_1_with_its_request_id() -> None:
    command = ClaimCommand(uuid.uuid4(), "u", "PROMO")
    message_id, body = encode_claims([command])
    assert (message_id, body) == (str(command.request_id), command.body())
    assert decode_claims(message_id, body, None).commands == [command]


def test_a_poison_claim_among_several_is_set_apart_with_its_own_dead_letter() -> None:
    good = ClaimCommand(uuid.uuid4(), "u", "PROMO")
    bad_id = str(uuid.uuid4())
    body = orjson.dumps(
        {
            "v": 2,
            "claims": [
                {"request_id": str(good.request_id), "user_id": "u", "coupon_name": "PROMO"},
                {"request_id": bad_id, "user_id": "", "coupon_name": "PROMO"},
                {"request_id": "nope", "user_id": "v", "coupon_name": "PROMO"},
                7,
            ],
        }
    )
    decoded = decode_claims(str(uuid.uuid4()), body, None)
    assert decoded.commands == [good]
    assert [p.request_id for p in decoded.poison] == [bad_id, "nope", None]
    assert orjson.loads(decoded.poison[0].body) == {"v": 1, "user_id": "", "coupon_name": "PROMO"}
    assert "user_id" in str(decoded.poison[0].error)
    assert "not a UUID" in str(decoded.poison[1].error)


@pytest.mark.parametrize(
    "body",
    [b'{"v": 2}', b'{"v": 2, "claims": []}', b'{"v": 2, "claims": {"a": 1}}', b'{"v": 9}'],
)
def test_a_message_of_claims_that_is_wrong_as_a_whole_is_poison(body: bytes) -> None:
    with pytest.raises(PoisonMessage):
        decode_claims(str(uuid.uuid4()), body, None)


def test_the_stock_left_travels_with_a_result_but_is_not_part_of_the_answer() -> None:
    command = ClaimCommand(uuid.uuid4(), "u", "c")
    told = ClaimResult.of(command, Outcome.CLAIMED, remaining=0)
    back = ClaimResult.loads(told.dumps())
    assert back.remaining == 0 and back == ClaimResult.of(command, Outcome.CLAIMED)
    assert "remaining" not in answers.body(told)


TRACE_A = "00-" + "a" * 32 + "-" + "1" * 16 + "-01"
TRACE_B = "00-" + "b" * 32 + "-" + "2" * 16 + "-01"


def test_each_claim_keeps_its_own_trace_in_a_message_carrying_several() -> None:
    commands = [
        ClaimCommand(uuid.uuid4(), "u1", "PROMO", trace=TRACE_A),
        ClaimCommand(uuid.uuid4(), "u2", "PROMO", trace=TRACE_B),
        ClaimCommand(uuid.uuid4(), "u3", "PROMO"),
    ]
    message_id, body = encode_claims(commands)
    decoded = decode_claims(message_id, body, "replies:gw", traceparent=TRACE_B)
    assert [c.trace for c in decoded.commands] == [TRACE_A, TRACE_B, None]
    # The trace is not part of the claim: the same claim with another trace is equal.
    assert decoded.commands[0] == ClaimCommand(commands[0].request_id, "u1", "PROMO", "replies:gw")


def test_a_single_claim_takes_its_trace_from_the_message_header() -> None:
    command = ClaimCommand(uuid.uuid4(), "u1", "PROMO", trace=TRACE_A)
    message_id, body = encode_claims([command])
    assert b"traceparent" not in body
    decoded = decode_claims(message_id, body, None, traceparent=TRACE_A)
    assert decoded.commands[0].trace == TRACE_A


def test_a_poison_claims_dead_letter_leaves_its_trace_out_of_the_body() -> None:
    body = orjson.dumps(
        {
            "v": 2,
            "claims": [
                {
                    "request_id": str(uuid.uuid4()),
                    "user_id": "",
                    "coupon_name": "P",
                    "traceparent": TRACE_A,
                },
            ],
        }
    )
    decoded = decode_claims(str(uuid.uuid4()), body, None)
    assert orjson.loads(decoded.poison[0].body) == {"v": 1, "user_id": "", "coupon_name": "P"}


def test_a_short_json_text_holds_only_its_own_length() -> None:
    """orjson hands back a buffer of 4 KiB at least; what flashclaim keeps (responses,
    command bodies, results) is copied to its length (a burst holds thousands)."""
    import tracemalloc

    value = {"error": "no stock left", "code": "out_of_stock", "request_id": str(uuid.uuid4())}
    assert dumps(value) == orjson.dumps(value)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        kept = [dumps(value) for _ in range(500)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown / len(kept) < 400, f"{grown / len(kept):.0f} bytes a text of {len(kept[0])}"


def test_the_gateway_loads_no_token_library_while_tokens_are_off() -> None:
    """PyJWT and the cryptography it brings cost some 9 MB a gateway process."""
    import subprocess
    import sys

    code = "import sys, gateway.service; print('jwt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
