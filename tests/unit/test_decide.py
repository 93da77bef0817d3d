from __future__ import annotations

import uuid

from consumer.decide import decide
from flashclaim.core.messages import ClaimCommand, Outcome


def claim(user: str, coupon: str = "C") -> ClaimCommand:
    return ClaimCommand(uuid.uuid4(), user, coupon)


def test_grants_in_arrival_order_until_stock_runs_out() -> None:
    requests = [claim(f"u{i}") for i in range(5)]
    assert decide({"C": 3}, [], requests) == [Outcome.CLAIMED] * 3 + [Outcome.OUT_OF_STOCK] * 2


def test_existing_holder_gets_already_claimed_even_when_sold_out() -> None:
    assert decide({"C": 0}, [("C", "alice")], [claim("alice"), claim("bob")]) == [
        Outcome.ALREADY_CLAIMED,
        Outcome.OUT_OF_STOCK,
    ]


def test_same_user_twice_in_one_batch_gets_one_coupon() -> None:
    outcomes = decide({"C": 10}, [], [claim("alice"), claim("alice"), claim("alice")])
    assert outcomes == [Outcome.CLAIMED, Outcome.ALREADY_CLAIMED, Outcome.ALREADY_CLAIMED]


def test_unknown_coupon_is_a_business_answer() -> None:
    assert decide({"C": 1}, [], [claim("alice", "NOPE")]) == [Outcome.NO_SUCH_COUPON]


def test_coupons_are_independent() -> None:
    requests = [claim("alice", "A"), claim("alice", "B"), claim("bob", "A"), claim("bob", "B")]
    assert decide({"A": 1, "B": 2}, [], requests) == [
        Outcome.CLAIMED,
        Outcome.CLAIMED,
        Outcome.OUT_OF_STOCK,
        Outcome.CLAIMED,
    ]


def test_holder_of_another_coupon_is_still_eligible() -> None:
    assert decide({"A": 1}, [("B", "alice")], [claim("alice", "A")]) == [Outcome.CLAIMED]


def test_input_stock_is_not_mutated() -> None:
    stock = {"C": 1}
    decide(stock, [], [claim("alice")])
    assert stock == {"C": 1}
