"""``flashclaim claim show REQUEST_ID``: everything the system knows about one claim.

Where a claim can be, and where this looks: the inbox (the command as the consumer
recorded it, its attempts and its answer), the claims table (a grant), Redis (the
answer kept for ``GET /api/claims/{id}``: the consumer's, or one the gateway gave by
itself), the dead-letter queue (peeked, nothing removed), and the outbox (its
``coupon.claimed`` event and whether it was published). When the claim was traced, its
trace id (from the inbox row or the event) finds it in the tracing backend.

Exit codes: 0 something is known of it; 1 nothing is; 2 a bad id or a server that
cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

from flashclaim.core import broker
from flashclaim.core.db import queries
from flashclaim.core.errors import InvalidInput
from flashclaim.core.messages import ClaimResult
from flashclaim.core.results import ResultStore, redis_client
from flashclaim.core.settings import Settings
from flashclaim.ops.deadletters import DeadLetterQueue


@dataclass
class ClaimStory:
    request_id: str
    verdict: str
    inbox: dict[str, Any] | None
    claim: dict[str, Any] | None
    redis: dict[str, Any] | None
    dead_letter: dict[str, Any] | None
    event: dict[str, Any] | None
    trace_id: str | None = None

    @property
    def known(self) -> bool:
        return any((self.inbox, self.claim, self.redis, self.dead_letter, self.event))

    def render(self) -> str:
        lines = [f"claim {self.request_id}: {self.verdict}"]
        for name in ("inbox", "claim", "redis", "dead_letter", "event"):
            part = getattr(self, name)
            shown = "-" if part is None else ", ".join(f"{k}={v}" for k, v in part.items())
            lines.append(f"  {name.replace('_', ' '):<12} {shown}")
        lines.append(f"  {'trace':<12} {self.trace_id or '- (not traced)'}")
        return "\n".join(lines)


def verdict(
    inbox: dict[str, Any] | None,
    redis: dict[str, Any] | None,
    dead_letter: dict[str, Any] | None,
    claim: dict[str, Any] | None = None,
) -> str:
    """One line: what became of the claim, from the most authoritative source."""
    if claim is not None and (inbox is None or inbox["outcome"] != "claimed"):
        # Its command row went with the inbox's deduplication window, or was made again by
        # a retry after it (consumer/retention.py).
        after = "pruned" if inbox is None else f"retried after it: {inbox['outcome']}"
        return f"granted (its command is past the inbox's deduplication window, {after})"
    if inbox is not None and inbox["status"] == "PROCESSED":
        if inbox["outcome"] == "claimed":
            return "granted"
        return f"refused: {inbox['outcome']}"
    if dead_letter is not None:
        return f"dead-lettered ({dead_letter['reason']}): {dead_letter['error'] or '-'}"
    if inbox is not None:
        attempts = inbox["retry_count"]
        return f"{inbox['status'].lower()} in the inbox after {attempts} failed attempt(s)"
    if redis is not None and redis["outcome"] == "pending":
        return "accepted (answered 202), not applied yet: queued or in a consumer's hands"
    if redis is not None:
        where = "answered by the gateway" if redis["source"] == "gateway" else "answered"
        return f"{where}: {redis['outcome']}"
    return (
        "unknown: no trace of this request id (expired, pruned after the deduplication"
        " window, or never accepted)"
    )


async def tell(settings: Settings, request_id: uuid.UUID, scan: int = 10_000) -> ClaimStory:
    q = queries()
    params = {"request_id": request_id}
    with psycopg.connect(settings.database_url, row_factory=dict_row) as conn:
        inbox = conn.execute(q["story_inbox"].encode(), params).fetchone()
        claim = conn.execute(q["story_claim"].encode(), params).fetchone()
        event = conn.execute(q["story_event"].encode(), params).fetchone()
    client = redis_client(settings.redis_url, settings.redis_sentinel_password.get_secret_value())
    try:
        store = ResultStore(client, settings.namespace, settings.result_ttl_seconds)
        consumer_raw, gateway_raw, legacy_raw, pending_raw = await client.mget(
            store.result_key(request_id),
            store.gateway_answer_key(request_id),
            store.legacy_gateway_answer_key(request_id),
            store.pending_key(request_id),
        )
    finally:
        await client.aclose()
    redis = None
    gateway_raw = gateway_raw if gateway_raw is not None else legacy_raw
    raw = consumer_raw if consumer_raw is not None else gateway_raw
    if raw is None and pending_raw is not None:
        redis = {"source": "gateway", "outcome": "pending"}
    elif raw is not None:
        result = ClaimResult.loads(raw)
        redis = {
            "source": "consumer" if consumer_raw is not None else "gateway",
            "outcome": result.outcome.code,
            "user_id": result.user_id,
            "coupon_name": result.coupon_name,
        }
    connection = await broker.connect(settings.amqp_url, "flashclaim claim show", 10)
    async with connection:
        letter = await DeadLetterQueue(connection, settings.topology()).find(str(request_id), scan)
    dead = (
        None
        if letter is None
        else {"reason": letter.reason, "error": letter.error, "error_type": letter.error_type}
    )
    return ClaimStory(
        str(request_id),
        verdict(inbox, redis, dead, claim),
        _plain(inbox),
        _plain(claim),
        redis,
        dead,
        _plain(event),
        _trace_id(inbox, event),
    )


def _trace_id(inbox: dict[str, Any] | None, event: dict[str, Any] | None) -> str | None:
    """The trace id of the claim's ``traceparent`` (``00-<trace id>-<span id>-<flags>``)."""
    payload = (inbox or {}).get("payload") or {}
    for traceparent in (payload.get("traceparent"), (event or {}).get("traceparent")):
        parts = traceparent.split("-") if isinstance(traceparent, str) else []
        if len(parts) == 4 and len(parts[1]) == 32:
            return parts[1]
    return None


def _plain(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        k: v if isinstance(v, int | float | dict | list | None) else str(v) for k, v in row.items()
    }


def add_parser(sub: Any) -> None:
    p = sub.add_parser("claim", help="one claim's story: inbox, answer, DLQ, event")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("show", help="everything known about one request id")
    a.add_argument("request_id")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.add_argument(
        "--scan", type=int, default=10_000, help="DLQ messages read at most (default 10000)"
    )
    p.set_defaults(func=run, service="claim")


def run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        request_id = uuid.UUID(args.request_id)
    except ValueError:
        raise InvalidInput(f"not a request id: {args.request_id!r}") from None
    story = asyncio.run(tell(settings, request_id, args.scan))
    print(json.dumps(asdict(story), indent=2) if args.json else story.render())
    return 0 if story.known else 1
