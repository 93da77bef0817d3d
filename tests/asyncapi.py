"""The events' AsyncAPI description (docs/asyncapi.json), as the tests check messages
against it."""

from __future__ import annotations

import datetime as dt
import json
from functools import cache
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator, FormatChecker

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "asyncapi.json"


@cache
def document() -> dict[str, Any]:
    return dict(json.loads(DOCUMENT.read_text()))


def described(routing_key: str, content_type: str | None) -> dict[str, Any]:
    """The message the description gives for this event type and content type."""
    for message in document()["components"]["messages"].values():
        if message["name"] == routing_key and message["contentType"] == content_type:
            return dict(message)
    raise AssertionError(f"no message described for {routing_key!r} as {content_type!r}")


# jsonschema checks "date-time" only with an optional package: checked here with the
# standard library (an RFC 3339 time with its offset, as the relay writes it).
def _date_time(value: object) -> bool:
    return not isinstance(value, str) or dt.datetime.fromisoformat(value).tzinfo is not None


FORMATS = FormatChecker()
FORMATS.checkers["date-time"] = (_date_time, ValueError)


def validator(schema: dict[str, Any]) -> Draft202012Validator:
    """``schema`` with the description's components beside it, so its references resolve."""
    return Draft202012Validator(
        {**schema, "components": document()["components"]}, format_checker=FORMATS
    )


def check_message(routing_key: str, content_type: str | None, body: bytes) -> None:
    """Raise unless this published message is one the description gives, its body valid
    against that message's payload schema."""
    payload = described(routing_key, content_type)["payload"]
    validator(payload).validate(orjson.loads(body))
