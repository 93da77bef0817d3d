"""The consumer's writes to PostgreSQL: a batch of claim commands applied in one
transaction, and a failed attempt counted in the inbox. This module is the only writer
of the inbox.

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
from psycopg_pool import AsyncConnectionPool

from consumer.decide import decide
from flashclaim.core.db import queries
from flashclaim.core.events import Coupon, batch_events
from flashclaim.core.messages import CLAIM_EVENT, ClaimCommand, ClaimResult, Outcome
from flashclaim.core.retry import transient_retry


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

    @classmethod
    def total(cls, outcomes: Iterable[BatchOutcome]) -> BatchOutcome:
        """The outcomes of several transactions as one (empty for none)."""
        results: dict[uuid.UUID, ClaimResult] = {}
        decided: Counter[str] = Counter()
        applied = replayed = granted = 0
        for o in outcomes:
            results.update(o.results)
            decided.update(o.decided)
            applied += o.applied
            replayed += o.replayed
            granted += o.granted
        return cls(results, applied, replayed, granted, decided)


@dataclass(frozen=True, slots=True)
class Attempts:
    """A command's failed attempts so far, and whether that was the last one."""

    count: int
    final: bool


class ClaimStore:
    """Where one consumer's claims are applied (``pool``), under its name in the inbox's
    ``locked_by`` (``worker_id``), with ``max_attempts`` failed attempts to a command."""

    def __init__(self, pool: AsyncConnectionPool, worker_id: str, max_attempts: int) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.max_attempts = max_attempts

    async def apply(self, deliveries: Sequence[Delivery]) -> BatchOutcome:
        """Apply ``deliveries`` in one transaction (:func:`apply_batch`), once: the
        caller decides what an error means and whether to run it again."""
        async with self.pool.connection(timeout=5.0) as conn, conn.transaction():
            return await apply_batch(conn, deliveries, self.worker_id)

    async def record_failure(self, delivery: Delivery, error: BaseException) -> Attempts | None:
        """Count a failed attempt of ``delivery`` in the inbox, in a transaction of its own
        (the batch's was rolled back), retried for a moment on a transient fault; the
        error stays in the row for the operators. ``None`` if the command was applied
        meanwhile (by another delivery): nothing is to be retried, its redelivery is
        answered from the inbox. Raises if the inbox cannot be written."""
        command = delivery.command
        async for attempt in transient_retry(2.0):
            with attempt:
                async with self.pool.connection(timeout=2.0) as conn:
                    cur = await conn.execute(
                        queries()["inbox_record_failure"],
                        {
                            "message_id": command.request_id,
                            "sender": delivery.sender,
                            "payload": orjson.dumps(
                                {"user_id": command.user_id, "coupon_name": command.coupon_name}
                            ).decode(),
                            "max_attempts": self.max_attempts,
                            "event_type": CLAIM_EVENT,
                            "exchange": delivery.exchange,
                            "routing_key": delivery.routing_key,
                            "error": f"{type(error).__name__}: {error}"[:2000],
                        },
                    )
                    row = await cur.fetchone()
        if row is None:
            return None
        retry_count, status = row
        return Attempts(int(retry_count), status == "FAILED")


def _json(rows: Iterable[dict[str, Any]]) -> str:
    """One query parameter for many rows (read in SQL with jsonb_to_recordset); a UUID
    in them is written by orjson, in its canonical text."""
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
                    "message_id": i,
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
        for message_id, status, outcome, payload in await cur.fetchall():
            if status == "PROCESSED":
                results[message_id] = ClaimResult(
                    message_id,
                    Outcome.of_code(outcome),
                    payload["user_id"],
                    payload["coupon_name"],
                )
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
                    "message_id": c.request_id,
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
                    {"message_id": r.request_id, "outcome": r.outcome.code} for r in fresh_results
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
