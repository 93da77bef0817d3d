"""Turning request fields into checked values, or :class:`InvalidInput` (the body into a
JSON object: core/http.py)."""

from __future__ import annotations

from flashclaim.core.errors import InvalidInput
from flashclaim.core.messages import check_name

AMOUNT_MAX = 2_147_483_647  # PostgreSQL integer
IDEMPOTENCY_KEY_MAX = 255


def amount(value: object) -> int:
    # bool is a subclass of int in Python; JSON true/false are not amounts.
    if type(value) is not int or not 1 <= value <= AMOUNT_MAX:
        raise InvalidInput(f"'amount' must be an integer between 1 and {AMOUNT_MAX}")
    return value


def name(value: object, field: str) -> str:
    return check_name(value, field)


def idempotency_key(value: str | None) -> str | None:
    """1 to 255 printable ASCII characters (an HTTP header value; anything else,
    including bytes that are not UTF-8, is refused with 400)."""
    if value is None:
        return None
    if not (1 <= len(value) <= IDEMPOTENCY_KEY_MAX and value.isascii() and value.isprintable()):
        raise InvalidInput(
            f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters"
        )
    return value
