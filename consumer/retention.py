"""The inbox's deduplication window: processed commands are forgotten once older than
``INBOX_RETENTION_SECONDS`` (seven days by default).

What the prune relies on, and what it keeps:

1. a command is delivered again only within seconds or minutes of its processing (a
   consumer lost between its commit and its ack) or from the dead-letter queue; the
   window is days long, and longer than Redis keeps the answer
   (``RESULT_TTL_SECONDS``, checked at start), so every retry and redelivery the
   system can make finds its answer in Redis or the inbox;
2. FAILED rows stay whatever their age: their commands wait in the dead-letter queue,
   and a replay must still find the row it counts attempts in. PENDING rows stay too;
3. should a command come back after its row is gone, it is decided again like a new
   one: the claims table allows a user one claim of a coupon, so a granted claim is
   answered ``already_claimed`` and no stock moves twice. Nothing is granted twice
   because a row was forgotten;
4. rows go a bounded number at a time (``INBOX_PRUNE_BATCH``), each batch its own
   short transaction taking only rows no one holds (``SKIP LOCKED``): several
   consumers prune side by side, and a batch in a worker's hands is never waited for.

Why batches of deletes and not a table partitioned by day, dropping old partitions:
a partitioned table's unique index must include the partition key, so the inbox could
no longer refuse a second row for one message id across days, which is the dedup
itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import psycopg
from psycopg_pool import AsyncConnectionPool

from flashclaim.core.db import queries

log = logging.getLogger(__name__)


class InboxPruner:
    def __init__(self, pool: AsyncConnectionPool, retention_seconds: float, batch: int) -> None:
        self._pool = pool
        self._retention = retention_seconds
        self._batch = batch

    async def prune(self, most_batches: int = 1_000) -> int:
        """Delete processed rows past the window, a batch at a time, until a batch finds
        fewer than it may take (or ``most_batches`` were deleted); how many went."""
        total = 0
        for _ in range(most_batches):
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    queries()["inbox_prune"],
                    {"retention": self._retention, "limit": self._batch},
                )
            total += cur.rowcount
            if cur.rowcount < self._batch:
                break
            await asyncio.sleep(0)  # the batches in flight go first
        return total

    async def run(self, every: float, pause: Callable[[float], Awaitable[bool]]) -> None:
        """Prune every ``every`` seconds until ``pause`` says a stop came; a database
        away is waited out."""
        while not await pause(every):
            try:
                pruned = await self.prune()
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.warning("inbox not pruned", extra={"error": repr(exc)})
                continue
            if pruned:
                log.info(
                    "inbox pruned",
                    extra={"rows": pruned, "older_than_seconds": self._retention},
                )
