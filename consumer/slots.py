"""A consumer's index when it has none of its own (``CONSUMER_INDEX=auto``).

Consumers started as identical replicas (``docker compose up --scale consumer=N``, a
Kubernetes Deployment) cannot be told "you are consumer i". Each takes the lowest free
slot of ``CONSUMER_COUNT`` instead: slot i is a session-level PostgreSQL advisory lock
(the namespace's key, i), held on a connection of its own for as long as the consumer
runs, and released by the server when that connection ends (a consumer that dies frees
its slot at once). A consumer that finds every slot taken runs as a stand-by of every
partition.

What a lost lock costs: if the slot's connection drops (the database restarts), another
consumer may take the same slot, and two consumers then subscribe to the same
partitions at once. Nothing is applied twice for it: each command queue has a single
active consumer, and the inbox makes any redelivery a replay. Only the balance of the
partitions suffers until a consumer restarts.
"""

from __future__ import annotations

import contextlib
import logging
import zlib

import psycopg

log = logging.getLogger(__name__)


def lock_key(namespace: str) -> int:
    """The advisory lock class of a namespace's slots (a signed 32-bit integer)."""
    return zlib.crc32(f"flashclaim.consumer-slots.{namespace}".encode()) - 2**31


class ConsumerSlot:
    def __init__(self, database_url: str, namespace: str, slots: int) -> None:
        self._url = database_url
        self._key = lock_key(namespace)
        self._slots = slots
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None

    async def take(self) -> int | None:
        """The lowest free slot, now held; ``None`` if every slot is taken."""
        self._conn = await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, application_name="flashclaim-consumer-slot"
        )
        for slot in range(self._slots):
            cur = await self._conn.execute(
                "SELECT pg_try_advisory_lock(%s::int, %s::int)", (self._key, slot)
            )
            row = await cur.fetchone()
            if row is not None and row[0]:
                log.info("consumer slot taken", extra={"slot": slot, "slots": self._slots})
                return slot
        log.warning("every consumer slot is taken: standing by for all partitions")
        return None

    async def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
