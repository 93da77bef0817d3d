"""The business decision for a batch of claims, with no I/O.

Given each coupon's remaining stock, the (coupon, user) pairs that already hold a claim,
and the new requests in arrival order, return each request's outcome. Eligibility is
checked before stock: a user who holds the coupon gets ALREADY_CLAIMED even once it is
sold out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from flashclaim.core.messages import ClaimCommand, Outcome


def decide(
    stock: Mapping[str, int],
    holders: Iterable[tuple[str, str]],
    requests: Sequence[ClaimCommand],
) -> list[Outcome]:
    remaining = dict(stock)
    held = set(holders)
    outcomes: list[Outcome] = []
    for request in requests:
        key = (request.coupon_name, request.user_id)
        if request.coupon_name not in remaining:
            outcome = Outcome.NO_SUCH_COUPON
        elif key in held:
            outcome = Outcome.ALREADY_CLAIMED
        elif remaining[request.coupon_name] <= 0:
            outcome = Outcome.OUT_OF_STOCK
        else:
            remaining[request.coupon_name] -= 1
            held.add(key)
            outcome = Outcome.CLAIMED
        outcomes.append(outcome)
    return outcomes
