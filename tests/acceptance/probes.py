"""Clients calling in loops of their own while a server fails over: what they saw."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from tests.acceptance.conftest import Services


@dataclass
class Seen:
    """What a client calling in a loop during the failover saw: (start, end, status)."""

    calls: list[tuple[float, float, int]] = field(default_factory=list)

    def count(self, status: int) -> int:
        return sum(1 for *_, s in self.calls if s == status)

    def slowest(self) -> float:
        return max((end - start for start, end, _ in self.calls), default=0.0)

    def span(self, status: int) -> float:
        """From the first call answered ``status`` to the end of the last one."""
        calls = [(start, end) for start, end, s in self.calls if s == status]
        return max(e for _, e in calls) - min(s for s, _ in calls) if calls else 0.0


async def probe(
    http: aiohttp.ClientSession, services: Services, coupon: str, stop: asyncio.Event
) -> tuple[Seen, Seen]:
    """Coupon reads (the database's) and fresh claims of ``coupon`` (202 while the
    consumer holds them), each in a loop of its own, until ``stop``."""
    reads, claims = Seen(), Seen()

    async def loop(seen: Seen, call: Callable[[int], Awaitable[int]]) -> None:
        i = 0
        while not stop.is_set():
            started = time.monotonic()
            status = await call(i)
            seen.calls.append((started, time.monotonic(), status))
            i += 1
            await asyncio.sleep(0.05)

    async def read(_: int) -> int:
        async with http.get(f"{services.base_url}/api/coupons/{coupon}") as r:
            return r.status

    async def claim(i: int) -> int:
        async with http.post(
            f"{services.base_url}/api/coupons/claim",
            json={"user_id": f"probe_{i}", "coupon_name": coupon},
        ) as r:
            return r.status

    await asyncio.gather(loop(reads, read), loop(claims, claim))
    return reads, claims
