"""A few thousand claims over tens of coupons with repeated users, and the checks that
the answers and the database agree exactly afterwards."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import psycopg

from flashclaim.core.messages import ClaimResult, Outcome
from flashclaim.core.settings import Settings
from flashclaim.devtools import processes, promises
from flashclaim.devtools.client import Answer, ClaimClient
from flashclaim.devtools.tokens import headers_of
from gateway import http_answers as http
from tests.acceptance.conftest import Services, service_env


@dataclass
class Window:
    """When a fault was on (wall-clock seconds): connection errors are allowed in it."""

    start: float
    end: float = float("inf")
    # When the fault had taken effect (a server stopped takes a moment to go): claims
    # in flight then are the ones it reached. The start, until told.
    effective: float = 0.0

    def hit(self) -> None:
        self.effective = time.time()

    def close(self) -> None:
        self.end = time.time()

    def reached(self, answers: list[Answer], delayed: bool = True) -> list[Answer]:
        """The claims the fault surely reached: in flight when it had taken effect
        (sent before, answered after), and if ``delayed``, delayed by it (a 202
        followed, or a retry)."""
        moment = self.effective or self.start
        return [
            a
            for a in answers
            if a.sent_at < moment < a.answered_at and (a.pending or a.retries or not delayed)
        ]

    def __contains__(self, moment: float) -> bool:
        # A request cut by the fault may fail up to the client's timeout after it began.
        return self.start <= moment <= self.end + 5


@dataclass
class Load:
    """``coupons`` coupons: the first ``ample`` (half by default) with a stock of
    ``users``, which no load can sell out (a user holds a coupon once), so that any
    "sold out" on them is wrong; the others with ``stock``, which sell out."""

    services: Services
    http: aiohttp.ClientSession
    claims: int = 2500
    coupons: int = 20
    stock: int = 40
    users: int = 300
    concurrency: int = 64
    seed: int = 7
    ample: int | None = None
    # More gateways to send claims to (a claim that gets no answer from one goes to the
    # next, with its key), and how long an attempt may take before it is given up.
    also: list[str] = field(default_factory=list)
    attempt_timeout: float | None = None
    names: list[str] = field(default_factory=list)
    stocks: dict[str, int] = field(default_factory=dict)
    done: int = 0
    task: asyncio.Future[list[Answer]] | None = None

    async def start(self) -> Load:
        tag = uuid.uuid4().hex[:8]
        self.names = [f"LOAD_{tag}_{i:02d}" for i in range(self.coupons)]
        ample = self.coupons // 2 if self.ample is None else self.ample
        self.stocks = {
            name: max(self.users, self.stock) if i < ample else self.stock
            for i, name in enumerate(self.names)
        }
        for name in self.names:
            async with self.http.post(
                f"{self.services.base_url}/api/coupons",
                json={"name": name, "amount": self.stocks[name]},
                headers=headers_of(self.services.credentials),
            ) as r:
                assert r.status == 201, await r.text()
        rng = random.Random(self.seed)
        requests = [
            (f"user_{rng.randrange(self.users):04d}", rng.choice(self.names))
            for _ in range(self.claims)
        ]
        client = ClaimClient(
            self.http,
            [self.services.base_url, *self.also],
            deadline=150,
            credentials=self.services.credentials,
            attempt_timeout=self.attempt_timeout,
        )
        gate = asyncio.Semaphore(self.concurrency)

        async def one(user: str, coupon: str) -> Answer:
            async with gate:
                answer = await client.claim(user, coupon)
            self.done += 1
            return answer

        self.task = asyncio.gather(*(one(u, c) for u, c in requests))
        return self

    async def reached(self, fraction: float, timeout: float = 120) -> None:
        """Wait until this share of the claims has its final answer."""
        async with asyncio.timeout(timeout):
            while self.done < fraction * self.claims:
                assert self.task is not None and not self.task.done()
                await asyncio.sleep(0.05)

    async def finish(self, timeout: float = 200) -> list[Answer]:
        assert self.task is not None
        async with asyncio.timeout(timeout):
            return await self.task


async def faulted(
    load: Load, inject: Callable[[Window], Awaitable[object]], at: float = 0.3
) -> tuple[list[Answer], Window]:
    """Once ``at`` of the load has its answer, ``inject`` (the fault, marking the window
    ``hit`` once it has taken effect, and its end): the answers, and when the fault was
    on."""
    await load.reached(at)
    window = Window(time.time())
    await inject(window)
    window.close()
    return await load.finish(), window


async def verify(
    settings: Settings,
    load: Load,
    answers: list[Answer],
    faults: tuple[Window, ...] = (),
    base_url: str | None = None,
) -> None:
    """The promises every run keeps (flashclaim/devtools/promises.py, over HTTP), then
    the database: answers and rows agree exactly, each "sold out" came after the
    coupon's last grant, no connection to the gateway failed outside ``faults``, and the
    audit passes. ``base_url``: the gateway to read the coupons from."""
    stray = [t for a in answers for t in a.connection_errors_at if not any(t in w for w in faults)]
    assert not stray, f"{len(stray)} connection errors outside any fault's window"
    verdict = await promises.check(
        load.http,
        base_url or load.services.base_url,  # a gateway still up
        (promises.Final(a.user_id, a.coupon_name, a.status) for a in answers),
        load.names,
        seen=(s for a in answers for s in a.seen),
        headers=headers_of(load.services.credentials),
    )
    assert verdict.ok, verdict.broken
    assert {a.status for a in answers} <= {200, 400, 409}, {a.status for a in answers}

    granted = [a for a in answers if a.status == 200]
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            # When each claim was committed: its transaction's commit time where the
            # server tracks it (the suite's does), else its start, a lower bound.
            "SELECT coupon_name, user_id, message_id::text, extract(epoch FROM coalesce("
            " CASE WHEN current_setting('track_commit_timestamp') = 'on'"
            " THEN pg_xact_commit_timestamp(xmin) END, claimed_at))"
            " FROM claims WHERE coupon_name = ANY(%s)",
            (load.names,),
        ).fetchall()
        stock: dict[str, int] = dict(
            conn.execute(
                "SELECT name, remaining_amount FROM coupons WHERE name = ANY(%s)", (load.names,)
            ).fetchall()
        )
    # No granted claim missing, no claim nobody was told about.
    assert sorted(r[2] for r in rows) == sorted(str(a.request_id) for a in granted)
    # Whoever was told "already claimed" does hold it, and no oversell.
    holders = {(r[0], r[1]) for r in rows}
    for a in answers:
        if a.status == 409:
            assert (a.coupon_name, a.user_id) in holders, a
    for name in load.names:
        assert stock[name] == load.stocks[name] - sum(1 for r in rows if r[0] == name) >= 0
    # Sold-out answers only once the stock was really gone, and never to a holder: each
    # arrived after the coupon's last grant was committed.
    last_grant = {name: 0.0 for name in load.names}
    for name, _, _, at in rows:
        last_grant[name] = max(last_grant[name], float(at))
    for a in answers:
        if a.status == 400:
            assert stock[a.coupon_name] == 0, a
            assert (a.coupon_name, a.user_id) not in holders, a
            assert a.answered_at >= last_grant[a.coupon_name], (
                f"{a}: sold out {last_grant[a.coupon_name] - a.answered_at:.3f} s"
                " before the last grant was committed"
            )
    # Every answer is the one the inbox recorded for its request id. Those without an
    # inbox row were given by the gateway itself (gateway/gateway_answers.py), which may only say
    # "already claimed" to a holder and "sold out" to a non-holder of a sold-out coupon.
    # The inbox keeps outcomes; the gateway's mapping makes the answer each should be.
    with psycopg.connect(settings.database_url) as conn:
        recorded = {}
        for request_id, outcome, user, coupon in conn.execute(
            "SELECT message_id, outcome, payload ->> 'user_id', payload ->> 'coupon_name'"
            " FROM inbox WHERE message_id = ANY(%s::uuid[]) AND status = 'PROCESSED'",
            ([a.request_id for a in answers if a.request_id],),
        ).fetchall():
            result = ClaimResult(request_id, Outcome.of_code(outcome), user, coupon)
            recorded[str(request_id)] = (http.status(result), http.body(result))
    for a in answers:
        assert a.request_id is not None, a
        if a.request_id in recorded:
            assert recorded[a.request_id] == (a.status, a.body), (a, recorded[a.request_id])
        else:
            assert a.status in (400, 409), f"{a}: no inbox row for a {a.status}"
    audit = await asyncio.to_thread(processes.audit, service_env(settings), load.names)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def outcome_counts(answers: list[Answer]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for a in answers:
        counts[str(a.status)] += 1
        counts["pending_followed"] += a.pending
        counts["retried"] += a.retries > 0
    return dict(counts)
