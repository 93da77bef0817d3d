"""Applying a batch of claim commands to PostgreSQL in one transaction.

Why a duplicate delivery cannot double a claim: the first statement inserts one inbox
row per message id (``ON CONFLICT DO NOTHING``). A message whose row was already
PROCESSED only gets its recorded result back. If two consumers hold the same message at
once, the second one's insert waits on the unique index until the first commits, then
finds the row. And whatever the code did, ``UNIQUE (user_id, coupon_name)`` and
``UNIQUE (message_id)`` on ``claims`` would refuse a second effect.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from consumer.decide import decide
from flashclaim.core.db import queries
from flashclaim.core.events import Coupon, batch_events
from flashclaim.core.messages import CLAIM_EVENT, ClaimCommand, ClaimResult, Outcome


@dataclass(frozen=True, slots=True)
class Delivery:
    """A decoded command with where it came from."""

    command: ClaimCommand
    sender: str
    exchange: str
    routing_key: str


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    results: dict[uuid.UUID, ClaimResult]
    applied: int  # commands applied now
    replayed: int  # commands that already had a recorded result
    granted: int
    # Outcome code -> commands applied now with it (replays not included).
    decided: Counter[str] = field(default_factory=Counter)


def _json(rows: Iterable[dict[str, Any]]) -> str:
    """One query parameter for many rows (read in SQL with jsonb_to_recordset)."""
    return orjson.dumps(list(rows)).decode()


async def apply_batch(
    conn: AsyncConnection[TupleRow], deliveries: Sequence[Delivery], worker_id: str
) -> BatchOutcome:
    """Apply ``deliveries`` in arrival order; return the result of every message id.

    Runs in the caller's transaction; nothing is visible before it commits.
    """
    q = queries()
    # The same message id twice in one batch is one command.
    unique: dict[uuid.UUID, Delivery] = {}
    for d in deliveries:
        unique.setdefault(d.command.request_id, d)
    ids = list(unique)

    cur = await conn.execute(
        q["inbox_insert"],
        {
            "rows": _json(
                {
                    "message_id": str(i),
                    "sender": unique[i].sender,
                    "payload": {
                        "user_id": unique[i].command.user_id,
                        "coupon_name": unique[i].command.coupon_name,
                        # Which trace to look in (flashclaim claim show), when traced.
                        **(
                            {"traceparent": unique[i].command.trace}
                            if unique[i].command.trace
                            else {}
                        ),
                    },
                }
                for i in ids
            ),
            "event_type": CLAIM_EVENT,
            "exchange": deliveries[0].exchange,
            "routing_key": deliveries[0].routing_key,
            "locked_by": worker_id,
        },
    )
    fresh = {row[0] for row in await cur.fetchall()}

    results: dict[uuid.UUID, ClaimResult] = {}
    existing = [i for i in ids if i not in fresh]
    if existing:
        cur = await conn.execute(q["inbox_lock_existing"], {"message_ids": existing})
        for message_id, status, result_status, result_body, payload in await cur.fetchall():
            if status == "PROCESSED":
                results[message_id] = ClaimResult.of_answer(message_id, result_status, result_body)
                continue
            # Left PENDING by an earlier attempt: apply it now, as first recorded. (A
            # client reusing an Idempotency-Key for another coupon sends the same id
            # with another body: the first claim is the one that counts, and the
            # gateway turns its answer into 422 for the second.)
            fresh.add(message_id)
            first = unique[message_id].command
            recorded = replace(
                first, user_id=payload["user_id"], coupon_name=payload["coupon_name"]
            )
            if recorded != first:
                unique[message_id] = replace(unique[message_id], command=recorded)
    todo = [unique[i].command for i in ids if i in fresh]
    if not todo:
        return BatchOutcome(results, applied=0, replayed=len(results), granted=0)

    names = sorted({c.coupon_name for c in todo})
    # Two reads in one round trip (pipeline mode), then the writes in another.
    async with conn.pipeline():
        locked = await conn.execute(q["lock_coupons"], {"names": names})
        held = await conn.execute(
            q["existing_holders"],
            {"rows": _json({"coupon_name": c.coupon_name, "user_id": c.user_id} for c in todo)},
        )
        coupons = {
            name: Coupon(amount, remaining) for name, amount, remaining in await locked.fetchall()
        }
        stock = {name: coupon.remaining for name, coupon in coupons.items()}
        holders = [(coupon, user) for coupon, user in await held.fetchall()]

    outcomes = decide(stock, holders, todo)
    granted = [c for c, o in zip(todo, outcomes, strict=True) if o is Outcome.CLAIMED]
    taken = Counter(c.coupon_name for c in granted)
    # What each coupon has left once this commits, told to the gateways with the results.
    left = {name: remaining - taken[name] for name, remaining in stock.items()}
    fresh_results = [
        ClaimResult.of(c, o, left.get(c.coupon_name)) for c, o in zip(todo, outcomes, strict=True)
    ]
    async with conn.pipeline():
        if granted:
            # What others hear of it, in the same transaction (the outbox).
            await conn.execute(q["outbox_insert"], {"rows": _json(batch_events(coupons, granted))})
            rows = (
                {
                    "coupon_name": c.coupon_name,
                    "user_id": c.user_id,
                    "message_id": str(c.request_id),
                }
                for c in granted
            )
            await conn.execute(q["insert_claims"], {"rows": _json(rows)})
            await conn.execute(
                q["deduct_stock"], {"names": list(taken), "taken": list(taken.values())}
            )
        await conn.execute(
            q["record_results"],
            {
                "rows": _json(
                    {"message_id": str(r.request_id), "status": r.status, "body": r.body}
                    for r in fresh_results
                ),
                "ids": [r.request_id for r in fresh_results],
            },
        )
    results.update((r.request_id, r) for r in fresh_results)
    return BatchOutcome(
        results,
        applied=len(todo),
        replayed=len(ids) - len(todo),
        granted=len(granted),
        decided=Counter(o.code for o in outcomes),
    )
