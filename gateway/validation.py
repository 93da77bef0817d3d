"""Turning request bodies into checked values, or :class:`InvalidInput`."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from flashclaim.core.errors import InvalidInput
from flashclaim.core.messages import check_name

AMOUNT_MAX = 2_147_483_647  # PostgreSQL integer
IDEMPOTENCY_KEY_MAX = 255


async def json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object (the body size cap is enforced by aiohttp: 413)."""
    raw = await request.read()
    if not raw.strip():
        raise InvalidInput("request body must be a JSON object")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidInput("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
    return data


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
