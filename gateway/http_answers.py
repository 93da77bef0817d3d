"""A claim's result as the HTTP client sees it: the one place outcomes become HTTP."""

from __future__ import annotations

from typing import Any

from flashclaim.core.messages import ClaimResult, Outcome, uuid_text

# The REST contract's statuses.
STATUS: dict[Outcome, int] = {
    Outcome.CLAIMED: 200,
    Outcome.ALREADY_CLAIMED: 409,
    Outcome.OUT_OF_STOCK: 400,
    Outcome.NO_SUCH_COUPON: 404,
}


def status(result: ClaimResult) -> int:
    return STATUS[result.outcome]


def body(result: ClaimResult) -> dict[str, Any]:
    common = {
        "user_id": result.user_id,
        "coupon_name": result.coupon_name,
        "request_id": uuid_text(result.request_id),
    }
    if result.outcome is Outcome.CLAIMED:
        return {"status": "claimed", **common}
    return {"error": result.outcome.message, "code": result.outcome.code, **common}
