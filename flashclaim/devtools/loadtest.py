"""``flashclaim loadtest``: load scenarios against a running gateway, with their checks.

- ``flash-sale``: N distinct users race for S coupons, C requests at a time;
- ``double-dip``: one user sends N claims for the same coupon at once;
- ``sustained``: an open-loop arrival rate R for T seconds over K coupons, a share of
  them on one hot coupon. Requests are sent on schedule whether or not earlier ones have
  answered, and latency counts from the scheduled time, so a stall shows up in the
  percentiles instead of silently lowering the load (no coordinated omission);
- ``mixed``: like ``sustained``, with a share of the requests reading the coupons;
- ``http-floor``: N ``GET /healthz``, C at a time: what the same burst costs over bare
  HTTP, the floor a burst of claims is compared with.

Afterwards every 202 is followed to its final answer, and the checks run: every request
answered finally, no 5xx, each coupon's ``claimed_by`` equals the users told they won,
nobody twice, ``remaining_amount = amount - len(claimed_by)``, and the scenario's own
expectation. Any failed check makes the command exit 1.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from flashclaim.devtools import promises
from flashclaim.devtools.loadreport import Recorder, Report
from flashclaim.devtools.tokens import Credentials, headers_of


@dataclass
class Run:
    """One load test in progress: what was sent, what came back."""

    http: aiohttp.ClientSession
    base: str
    # Tokens, when the gateway checks them (one a user, minted at its first request).
    credentials: Credentials | None = None
    recorder: Recorder = field(default_factory=Recorder)
    # (user, coupon) -> final statuses, one per request
    finals: list[tuple[str, str, int]] = field(default_factory=list)
    pending: list[tuple[str, str, str]] = field(default_factory=list)

    async def create_coupon(self, name: str, amount: int) -> None:
        async with self.http.post(
            f"{self.base}/api/coupons",
            json={"name": name, "amount": amount},
            headers=headers_of(self.credentials),
        ) as r:
            if r.status != 201:
                raise RuntimeError(f"creating coupon {name}: {r.status} {await r.text()}")

    async def claim(self, user: str, coupon: str, scheduled: float) -> None:
        try:
            async with self.http.post(
                f"{self.base}/api/coupons/claim",
                json={"user_id": user, "coupon_name": coupon},
                headers=headers_of(self.credentials, user),
            ) as r:
                status = r.status
                await r.read()
                location = r.headers.get("Location")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.recorder.errors[type(exc).__name__] += 1
            self.recorder.record(0, time.monotonic() - scheduled)
            self.finals.append((user, coupon, 0))
            return
        self.recorder.record(status, time.monotonic() - scheduled)
        if status == 202 and location:
            self.pending.append((user, coupon, location))
        else:
            self.finals.append((user, coupon, status))

    async def read(self, coupon: str, scheduled: float) -> None:
        await self.get(f"/api/coupons/{coupon}", scheduled)

    async def get(self, path: str, scheduled: float) -> None:
        """``GET path``, timed from ``scheduled``; only its status is kept."""
        try:
            async with self.http.get(
                f"{self.base}{path}", headers=headers_of(self.credentials)
            ) as r:
                status = r.status
                await r.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.recorder.errors[type(exc).__name__] += 1
            status = 0
        self.recorder.record(status, time.monotonic() - scheduled)

    async def follow_pending(self, deadline: float = 60.0) -> int:
        """Poll every 202 until its final answer; return how many stayed unanswered."""
        end = time.monotonic() + deadline
        left = list(self.pending)
        while left and time.monotonic() < end:
            still = []
            for user, coupon, location in left:
                token = headers_of(self.credentials, user)
                async with self.http.get(f"{self.base}{location}", headers=token) as r:
                    if r.status == 202 or r.status >= 500:
                        still.append((user, coupon, location))
                    else:
                        self.finals.append((user, coupon, r.status))
            left = still
            if left:
                await asyncio.sleep(0.2)
        for user, coupon, _ in left:
            self.finals.append((user, coupon, 202))
        return len(left)

    async def check(self, report: Report, coupons: list[str]) -> None:
        statuses = Counter(s for _, _, s in self.finals)
        report.details["final_statuses"] = {str(k): v for k, v in sorted(statuses.items())}
        report.details["followed_202"] = len(self.pending)
        verdict = await promises.check(
            self.http,
            self.base,
            (promises.Final(*f) for f in self.finals),
            coupons,
            headers=headers_of(self.credentials),
        )
        report.checks.update(verdict.checks)
        report.details["winners"] = sum(len(w) for w in verdict.winners.values())


async def _progress(recorder: Recorder, stop: asyncio.Event) -> None:
    """A progress line every second on stderr, and a last one at the end."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            print(recorder.progress_line(), file=sys.stderr, flush=True)
    print(recorder.progress_line(), file=sys.stderr, flush=True)


async def _closed_loop(run: Run, jobs: list[tuple[str, str]], concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(user: str, coupon: str) -> None:
        async with gate:
            run.recorder.sent += 1
            await run.claim(user, coupon, time.monotonic())

    await asyncio.gather(*(one(u, c) for u, c in jobs))


async def _open_loop(
    run: Run,
    rate: float,
    duration: float,
    max_outstanding: int,
    make: Callable[[int, float], Coroutine[Any, Any, None]],
) -> None:
    """Start request i at ``start + i / rate``, whatever happened to the earlier ones."""
    loop = asyncio.get_running_loop()
    total = int(rate * duration)
    start = loop.time()
    tasks: set[asyncio.Task[None]] = set()
    i = 0
    while i < total:
        due = min(total, int((loop.time() - start) * rate) + 1)
        while i < due:
            scheduled = start + i / rate
            # Latency counts from the schedule: convert loop time to monotonic time.
            scheduled_mono = time.monotonic() - (loop.time() - scheduled)
            if len(tasks) >= max_outstanding:
                run.recorder.dropped += 1
            else:
                run.recorder.sent += 1
                task = asyncio.create_task(make(i, scheduled_mono))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            i += 1
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
    if tasks:
        await asyncio.gather(*tasks)


async def run_scenario(
    name: str,
    base: str,
    params: dict[str, Any],
    progress: bool = True,
    credentials: Credentials | None = None,
) -> Report:
    connector = aiohttp.TCPConnector(limit=params.get("connections", 512))
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        run = Run(http, base.rstrip("/"), credentials)
        tag = uuid.uuid4().hex[:8]
        coupons, body = await _prepare(run, name, tag, params)
        stop = asyncio.Event()
        ticker = asyncio.create_task(_progress(run.recorder, stop)) if progress else None
        run.recorder.started = time.monotonic()
        try:
            await body()
        finally:
            stop.set()
            if ticker:
                await ticker
        seconds = time.monotonic() - run.recorder.started
        report = Report(name, params, run.recorder, seconds)
        unanswered = await run.follow_pending()
        report.details["unanswered_after_follow"] = unanswered
        await run.check(report, coupons)
        _expect(report, name, params, run)
        return report


async def _prepare(
    run: Run, name: str, tag: str, p: dict[str, Any]
) -> tuple[list[str], Callable[[], Awaitable[None]]]:
    if name == "flash-sale":
        coupon = f"FLASH_{tag}"
        await run.create_coupon(coupon, p["stock"])
        jobs = [(f"user_{tag}_{i}", coupon) for i in range(p["users"])]
        return [coupon], lambda: _closed_loop(run, jobs, p["concurrency"])
    if name == "http-floor":
        gate = asyncio.Semaphore(p["concurrency"])

        async def probe() -> None:
            async with gate:
                run.recorder.sent += 1
                await run.get("/healthz", time.monotonic())

        return [], lambda: _gather(probe() for _ in range(p["requests"]))
    if name == "double-dip":
        coupon = f"DIP_{tag}"
        await run.create_coupon(coupon, p["stock"])
        jobs = [(f"user_{tag}", coupon)] * p["attempts"]
        return [coupon], lambda: _closed_loop(run, jobs, p["attempts"])
    if name in ("sustained", "mixed"):
        k = p["coupons"]
        coupons = [f"HOT_{tag}"] + [f"WARM_{tag}_{i}" for i in range(k - 1)]
        total = int(p["rate"] * p["duration"])
        stock = p.get("stock") or total  # by default nobody is refused: every claim works
        for coupon in coupons:
            await run.create_coupon(coupon, stock)
        rng = random.Random(p.get("seed", 1))
        read_share = p.get("read_share", 0.0) if name == "mixed" else 0.0

        async def one(i: int, scheduled: float) -> None:
            hot = k == 1 or rng.random() < p["hot_share"]
            coupon = coupons[0] if hot else coupons[1 + rng.randrange(k - 1)]
            if rng.random() < read_share:
                await run.read(coupon, scheduled)
            else:
                await run.claim(f"user_{tag}_{i}", coupon, scheduled)

        return coupons, lambda: _open_loop(
            run, p["rate"], p["duration"], p.get("max_outstanding", 20_000), one
        )
    raise ValueError(f"unknown scenario {name!r}")


async def _gather(work: Iterable[Awaitable[None]]) -> None:
    await asyncio.gather(*work)


def _expect(report: Report, name: str, p: dict[str, Any], run: Run) -> None:
    finals = Counter(s for _, _, s in run.finals)
    if name == "http-floor":
        report.checks = {"every request 200": run.recorder.statuses[200] == p["requests"]}
    elif name == "flash-sale":
        winners = min(p["users"], p["stock"])
        report.checks[f"exactly {winners} winners"] = finals[200] == winners
        report.checks["everyone else told sold out"] = finals[400] == p["users"] - winners
    elif name == "double-dip":
        report.checks["exactly one success"] = finals[200] == 1
        report.checks["every other attempt 409"] = finals[409] == p["attempts"] - 1
    elif not p.get("stock"):
        report.checks["every claim granted (stock covers the load)"] = finals[200] == len(
            run.finals
        )
