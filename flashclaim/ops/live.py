"""The live view of a sale: the figures the services keep already, read at each refresh
of the console's page (console.py), never a store of their own.

- a coupon's stock: its row in PostgreSQL; the claims granted a second are the fall of
  ``remaining_amount`` between two reads;
- the gateways' figures: their ``/metrics`` pages (``CONSOLE_METRICS_URLS``): claims
  answered a second, held claims, claims in flight, refusals, open breakers; a consumer's
  or a relay's page, when listed, adds theirs (holding, outbox pending);
- the queues: each command partition's and the dead-letter queue's depth and consumers,
  from the broker (a passive declare).

A rate needs two readings. :class:`Rates` keeps the readings of the last ``window``
seconds of this process in memory (a few per figure) and gives the change across them a
second: the first view of a figure shows none yet, the next refresh does. A counter that
went down (a gateway restarted) starts over rather than giving a negative rate.

Each source is read on its own and may fail on its own: the page shows what it could
read and names what it could not, never a 500 because a server is away.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aio_pika.abc import AbstractRobustConnection
from prometheus_client.parser import text_string_to_metric_families
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from flashclaim.core.db import queries
from flashclaim.core.topology import Topology

# Figures of the live view: (sample name, labels it must carry) summed over every page.
FIGURES: dict[str, tuple[str, Mapping[str, str]]] = {
    "answered": ("flashclaim_claims_total", {}),
    "granted": ("flashclaim_claims_total", {"outcome": "claimed"}),
    "accepted": ("flashclaim_claims_total", {"outcome": "pending"}),
    "overloaded": ("flashclaim_http_errors_total", {"code": "overloaded"}),
    "unavailable": ("flashclaim_http_errors_total", {"code": "service_unavailable"}),
    "held": ("flashclaim_claims_held", {}),
    "in_flight": ("flashclaim_claims_in_flight", {}),
    "breakers_open": ("flashclaim_broker_breaker_open", {}),
    "consumers_holding": ("flashclaim_consumer_holding", {}),
    "outbox_pending": ("flashclaim_outbox_pending", {}),
}
# The figures that only grow (counters): shown as a rate a second.
COUNTERS = frozenset({"answered", "granted", "accepted", "overloaded", "unavailable"})


def figures(pages: Iterable[str]) -> dict[str, float | None]:
    """The live view's figures in Prometheus text ``pages``, summed over them; ``None``
    for a figure no page describes (a gateway's page holds no consumer figure), 0 for
    one described with nothing counted yet (no refusal so far)."""
    found: dict[str, float | None] = dict.fromkeys(FIGURES)
    for page in pages:
        for family in text_string_to_metric_families(page):
            for key, (name, _) in FIGURES.items():
                if name in (family.name, f"{family.name}_total") and found[key] is None:
                    found[key] = 0.0  # described, and none counted yet
            for sample in family.samples:
                for key, (name, labels) in FIGURES.items():
                    if sample.name == name and all(
                        sample.labels.get(k) == v for k, v in labels.items()
                    ):
                        found[key] = (found[key] or 0.0) + sample.value
    return found


@dataclass
class Rates:
    """Readings of growing figures over the last ``window`` seconds, by key; what each
    grew by a second across them."""

    window: float
    most_keys: int = 1_000
    _seen: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)

    def read(self, key: str, value: float, now: float | None = None) -> float | None:
        """Record ``value`` of ``key`` now; its rate a second since the oldest reading
        within the window (``None``: no earlier reading, or the figure went down)."""
        now = time.monotonic() if now is None else now
        seen = self._seen.get(key)
        if seen is None:
            self._forget(now)
            seen = self._seen[key] = deque()
        if seen and value < seen[-1][1]:
            seen.clear()  # the figure started over (its process restarted)
        # Keep one reading at least a window old, if any: the rate spans the window.
        while len(seen) > 1 and now - seen[1][0] >= self.window:
            seen.popleft()
        seen.append((now, value))
        then, before = seen[0]
        span = now - then
        if span <= 0:
            return None
        return (value - before) / span

    def _forget(self, now: float) -> None:
        """Drop the figures not read for a while (coupons nobody watches any more), and
        the oldest beyond ``most_keys``."""
        stale = [k for k, s in self._seen.items() if not s or now - s[-1][0] > 10 * self.window]
        for key in stale:
            del self._seen[key]
        while len(self._seen) >= self.most_keys:
            del self._seen[next(iter(self._seen))]


@dataclass(frozen=True)
class QueueDepth:
    name: str
    messages: int
    consumers: int


async def coupon(pool: AsyncConnectionPool, name: str) -> dict[str, Any] | None:
    async with pool.connection(timeout=3) as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(queries()["sale_coupon"].encode(), {"name": name})
        return await cur.fetchone()


async def recent_coupons(pool: AsyncConnectionPool, limit: int = 10) -> list[dict[str, Any]]:
    async with pool.connection(timeout=3) as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(queries()["sale_recent_coupons"].encode(), {"limit": limit})
        return await cur.fetchall()


async def pages(
    http: aiohttp.ClientSession, urls: Iterable[str], timeout: float = 2.0
) -> tuple[list[str], dict[str, str]]:
    """The text of each ``/metrics`` page at ``urls``, and why each one not read was not."""

    async def one(url: str) -> str:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                raise RuntimeError(f"answered {response.status}")
            return await response.text()

    urls = list(urls)
    answers = await asyncio.gather(*(one(u) for u in urls), return_exceptions=True)
    texts = [a for a in answers if isinstance(a, str)]
    failures = {
        u: f"{type(a).__name__}: {a}".rstrip(": ")
        for u, a in zip(urls, answers, strict=True)
        if isinstance(a, BaseException)
    }
    return texts, failures


async def queue_depths(
    connection: AbstractRobustConnection, topology: Topology
) -> list[QueueDepth]:
    """Each command partition's and the dead-letter queue's ready messages and consumers."""
    channel = await connection.channel()
    try:
        depths = []
        for name in [*topology.claims_queues, topology.claims_dlq]:
            declared = await channel.declare_queue(name, passive=True)
            result = declared.declaration_result
            depths.append(
                QueueDepth(name, int(result.message_count or 0), int(result.consumer_count or 0))
            )
        return depths
    finally:
        await channel.close()
