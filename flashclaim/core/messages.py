"""The claim commands that travel on RabbitMQ, and the results that come back.

A command message (JSON, ``content_type: application/json``) carries one claim::

    {"v": 1, "user_id": "user_12345", "coupon_name": "PROMO_SUPER"}

with the request id (a UUID) as its AMQP ``message_id``, or several claims of one coupon
that a gateway coalesced (one publish and one confirm for all of them)::

    {"v": 2, "claims": [{"request_id": "…", "user_id": "…", "coupon_name": "…"}, …]}

with a message id of its own. Either way ``reply_to`` names the Redis channel of the
gateway waiting for the answers. Each claim is applied, answered and dead-lettered on its
own: a claim that can never apply is dead-lettered alone, as a version 1 message.
When tracing is on, each claim carries its trace's W3C ``traceparent``
(flashclaim/core/tracing.py): the message's ``traceparent`` header for a single claim,
a ``"traceparent"`` field of each claim in a message carrying several.
"""

from __future__ import annotations

import enum
import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from flashclaim.core.errors import InvalidInput, PoisonMessage

VERSION = 1
MANY_VERSION = 2
CLAIM_EVENT = "coupon.claim.requested"
# The rules for coupon names and user ids, decided once here. A coupon name becomes an
# AMQP routing key (at most 255 bytes), a URL path segment and a Location header, so:
NAME_MAX = 128  # characters
NAME_MAX_BYTES = 255  # UTF-8 bytes: the AMQP short-string limit of a routing key
# Unicode categories refused anywhere in a name: control (Cc: NUL, newline, ESC...),
# format (Cf: bidi overrides, zero-width characters), surrogates (Cs), private use (Co),
# unassigned (Cn), line and paragraph separators (Zl, Zp). They cannot travel in a
# header and they make two names that look the same differ.
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def uuid_text(value: uuid.UUID) -> str:
    """``str(value)``, written by orjson's encoder in C: 0.4 µs against the 1.4 µs of
    ``UUID.__str__`` (pure Python), several times a claim on the claim path."""
    return orjson.dumps(value)[1:-1].decode()


def dumps(value: Any) -> bytes:
    """``value`` as JSON (orjson), in a bytes object of its own length.

    orjson hands back its working buffer, 4 KiB at least whatever the text's length: a
    body of a hundred bytes kept in memory (a response not written yet, a command
    waiting for the broker's confirm, an answer on its way to Redis) held that much, and
    a burst of thousands of claims held megabytes (10 to 14 MB a gateway process in
    ``make bench BENCH_ARGS=--bursts``). The copy of a short text costs well under a
    microsecond."""
    return memoryview(orjson.dumps(value)).tobytes()


def check_name(value: object, field: str) -> str:
    """Return ``value`` if it is a valid name (see the README's validation rules):
    a string of 1 to 128 characters and at most 255 UTF-8 bytes, not only white space,
    with no control, format, surrogate, private-use, unassigned or separator characters.
    """
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"'{field}' must be a non-empty string")
    if len(value) > NAME_MAX:
        raise InvalidInput(f"'{field}' must be at most {NAME_MAX} characters")
    if not value.isascii():
        if any(unicodedata.category(ch) in REFUSED_CATEGORIES for ch in value):
            raise InvalidInput(f"'{field}' must not contain control or format characters")
        if len(value.encode("utf-8")) > NAME_MAX_BYTES:
            raise InvalidInput(f"'{field}' must be at most {NAME_MAX_BYTES} bytes in UTF-8")
    elif not value.isprintable():
        raise InvalidInput(f"'{field}' must not contain control or format characters")
    return value


@dataclass(frozen=True, slots=True)
class ClaimCommand:
    request_id: uuid.UUID
    user_id: str
    coupon_name: str
    reply_to: str | None = None
    # The W3C traceparent of the claim's trace, when traced (not part of the claim).
    trace: str | None = field(default=None, compare=False)

    def body(self) -> bytes:
        return dumps({"v": VERSION, "user_id": self.user_id, "coupon_name": self.coupon_name})

    @classmethod
    def of_fields(
        cls,
        message_id: str | None,
        data: dict[str, Any],
        reply_to: str | None,
        trace: str | None = None,
    ) -> ClaimCommand:
        """A command from its request id and the fields of its JSON (``user_id``,
        ``coupon_name``); :class:`PoisonMessage` if they are not valid."""
        try:
            request_id = uuid.UUID(message_id or "")
        except ValueError:
            raise PoisonMessage(f"message_id {message_id!r} is not a UUID") from None
        try:
            user_id = check_name(data.get("user_id"), "user_id")
            coupon_name = check_name(data.get("coupon_name"), "coupon_name")
        except InvalidInput as exc:
            raise PoisonMessage(str(exc)) from None
        return cls(request_id, user_id, coupon_name, reply_to or None, trace)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PoisonMessage(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PoisonMessage("body is not a JSON object")
    return data


@dataclass(frozen=True, slots=True)
class PoisonClaim:
    """A claim inside a version 2 message that can never apply: what its dead letter
    carries (its request id, as given, as the message id; a version 1 body) and why."""

    request_id: str | None
    body: bytes
    error: PoisonMessage


@dataclass(frozen=True, slots=True)
class DecodedMessage:
    commands: list[ClaimCommand]
    poison: list[PoisonClaim]


def encode_claims(commands: Sequence[ClaimCommand]) -> tuple[str, bytes]:
    """``(message_id, body)`` of the message carrying ``commands`` (one coupon's): the
    version 1 form for a single claim, version 2 for several."""
    if len(commands) == 1:
        return uuid_text(commands[0].request_id), commands[0].body()
    body = dumps(
        {
            "v": MANY_VERSION,
            "claims": [
                {
                    "request_id": c.request_id,  # orjson writes a UUID's canonical text
                    "user_id": c.user_id,
                    "coupon_name": c.coupon_name,
                    **({"traceparent": c.trace} if c.trace else {}),
                }
                for c in commands
            ],
        }
    )
    return str(uuid.uuid4()), body


def decode_claims(
    message_id: str | None, body: bytes, reply_to: str | None, traceparent: str | None = None
) -> DecodedMessage:
    """The claims of a delivered message, and those of its claims that are poison
    (``traceparent``: the message's header, the trace of a single claim).

    Raise :class:`PoisonMessage` if the message as a whole can never apply (then it is
    dead-lettered whole)."""
    data = _json_object(body)
    if data.get("v") == VERSION:
        return DecodedMessage([ClaimCommand.of_fields(message_id, data, reply_to, traceparent)], [])
    if data.get("v") != MANY_VERSION:
        raise PoisonMessage(f"unknown message version {data.get('v')!r}")
    claims = data.get("claims")
    if not isinstance(claims, list) or not claims:
        raise PoisonMessage("'claims' is not a non-empty list")
    decoded = DecodedMessage([], [])
    for claim in claims:
        if not isinstance(claim, dict):
            claim = {"claim": claim}
        request_id = claim.get("request_id")
        request_id = request_id if isinstance(request_id, str) else None
        trace = claim.get("traceparent")
        trace = trace if isinstance(trace, str) else None
        try:
            decoded.commands.append(ClaimCommand.of_fields(request_id, claim, reply_to, trace))
        except PoisonMessage as exc:
            own = {
                "v": VERSION,
                **{k: v for k, v in claim.items() if k not in ("request_id", "traceparent")},
            }
            decoded.poison.append(PoisonClaim(request_id, orjson.dumps(own), exc))
    return decoded


class Outcome(enum.Enum):
    """Each business answer a claim can get: its code, and what it says when it is a
    refusal (HTTP statuses are the gateway's: gateway/http_answers.py)."""

    CLAIMED = ("claimed", "")
    ALREADY_CLAIMED = ("already_claimed", "this user already claimed this coupon")
    OUT_OF_STOCK = ("out_of_stock", "coupon is out of stock")
    NO_SUCH_COUPON = ("coupon_not_found", "no such coupon")

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message

    @classmethod
    def of_code(cls, code: str) -> Outcome:
        try:
            return _OUTCOMES[code]
        except KeyError:
            raise ValueError(f"not a claim outcome: {code!r}") from None


# By code: a dict lookup per reply (iterating an Enum builds a generator each time).
_OUTCOMES = {outcome.code: outcome for outcome in Outcome}


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """The final answer to one claim request: what was decided, for whom. Stored (Redis,
    the inbox) and passed between processes in this form; an HTTP answer only in the
    gateway."""

    request_id: uuid.UUID
    outcome: Outcome
    user_id: str
    coupon_name: str
    # The coupon's stock left once the batch that decided this claim committed, when the
    # consumer knows it: only ever an upper bound of the stock now (stock only goes
    # down). Gateways use it to hold back claims that cannot win (gateway/admission.py).
    # Not part of the answer, and not compared.
    remaining: int | None = field(default=None, compare=False)

    @classmethod
    def of(
        cls, command: ClaimCommand, outcome: Outcome, remaining: int | None = None
    ) -> ClaimResult:
        return cls(command.request_id, outcome, command.user_id, command.coupon_name, remaining)

    def dumps(self) -> bytes:
        data: dict[str, Any] = {
            "request_id": self.request_id,  # orjson writes a UUID's canonical text
            "outcome": self.outcome.code,
            "user_id": self.user_id,
            "coupon_name": self.coupon_name,
        }
        if self.remaining is not None:
            data["remaining"] = self.remaining
        return dumps(data)

    @classmethod
    def loads(cls, raw: bytes | str) -> ClaimResult:
        return cls.from_dict(orjson.loads(raw))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClaimResult:
        if "outcome" in data:
            fields = data
            code = data["outcome"]
        else:  # written before outcomes were stored: an HTTP answer (see _answer_code)
            fields = data["body"]
            code = _answer_code(fields)
        result = cls(
            uuid.UUID(data["request_id"]),
            Outcome.of_code(code),
            str(fields.get("user_id", "")),
            str(fields.get("coupon_name", "")),
        )
        remaining = data.get("remaining")
        if isinstance(remaining, int) and remaining >= 0:
            result = replace(result, remaining=remaining)
        return result

    @classmethod
    def loads_many(cls, raw: bytes | str) -> list[ClaimResult]:
        """A reply message: one result, or a JSON list of them."""
        data = orjson.loads(raw)
        items = data if isinstance(data, list) else [data]
        return [cls.from_dict(item) for item in items]


def _answer_code(body: dict[str, Any]) -> str:
    """The outcome code of a result stored by the release before outcomes were (an HTTP
    body: ``{"status": "claimed", ...}`` or ``{"code": ..., ...}``). Such values live in
    Redis for RESULT_TTL_SECONDS after the upgrade, and in replies of a consumer of that
    release while it rolls out; after that this can go."""
    code = body.get("code") or body.get("status")
    if not isinstance(code, str):
        raise ValueError(f"not a claim answer: {body!r}")
    return code
