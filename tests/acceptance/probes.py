"""Clients calling in loops of their own while a server fails over: what they saw."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from tests.acceptance.conftest import Services
from tests.acceptance.load import Load


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


@dataclass
class Probing:
    """Probes running until :meth:`stop`, which returns what they saw."""

    coupon: str
    stopped: asyncio.Event
    task: asyncio.Future[tuple[Seen, Seen]]

    async def stop(self) -> tuple[Seen, Seen]:
        """(coupon reads, claims)."""
        self.stopped.set()
        return await self.task


async def mid_load(services: Services, http: aiohttp.ClientSession) -> tuple[Load, Probing]:
    """The moment a failover test injects its fault: 2,000 claims over 10 coupons of 150
    (more stock than claims on most, so nearly every claim goes through the consumer: a
    sold-out coupon's are answered by the gateway alone), a fifth of them answered, and
    probes reading and claiming a coupon of their own."""
    load = await Load(services, http, claims=2000, coupons=10, stock=150).start()
    async with http.post(
        f"{services.base_url}/api/coupons",
        json={"name": f"PROBE_{uuid.uuid4().hex[:8]}", "amount": 10_000},
    ) as r:
        assert r.status == 201
        coupon = (await r.json())["name"]
    await load.reached(0.2)
    stopped = asyncio.Event()
    task = asyncio.ensure_future(probe(http, services, coupon, stopped))
    return load, Probing(coupon, stopped, task)
