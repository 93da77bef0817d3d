"""The concurrency scenarios the contract promises, run over HTTP against any gateway.

``flashclaim scenarios --url http://127.0.0.1:8080`` runs them against a live stack; the
acceptance tests run the same code against processes they start.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from flashclaim.devtools import promises
from flashclaim.devtools.client import ClaimClient
from flashclaim.devtools.tokens import Credentials, headers_of


@dataclass
class ScenarioReport:
    name: str
    coupon: str
    statuses: Counter[int] = field(default_factory=Counter)
    winners: list[str] = field(default_factory=list)
    pending_followed: int = 0
    retried: int = 0
    # Requests that got no answer at all (refused, reset, timed out), retried.
    connection_errors: int = 0
    # Every status seen on the way, interim ones (202, 503...) included.
    seen: Counter[int] = field(default_factory=Counter)
    coupon_state: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            self.violations.append(message)

    def summary(self) -> str:
        codes = ", ".join(f"{n}x{code}" for code, n in sorted(self.statuses.items()))
        verdict = "ok" if not self.violations else "FAILED: " + "; ".join(self.violations)
        return (
            f"{self.name:<12} {codes:<28} remaining={self.coupon_state.get('remaining_amount')}"
            f" 202s-followed={self.pending_followed} retried={self.retried}"
            f" {self.seconds:.2f}s  {verdict}"
        )


async def _json(response: aiohttp.ClientResponse) -> Any:
    return await response.json(content_type=None)


async def _run(
    http: aiohttp.ClientSession,
    base: str,
    name: str,
    stock: int,
    users: list[str],
    timeout: float,
    credentials: Credentials | None,
) -> ScenarioReport:
    coupon = f"{name.upper().replace('-', '_')}_{uuid.uuid4().hex[:10]}"
    report = ScenarioReport(name, coupon)
    async with http.post(
        f"{base}/api/coupons",
        json={"name": coupon, "amount": stock},
        headers=headers_of(credentials),
    ) as r:
        if r.status != 201:
            report.violations.append(f"coupon creation answered {r.status}: {await r.text()}")
            return report
    started = time.monotonic()
    client = ClaimClient(http, base, deadline=timeout, credentials=credentials)
    answers = await asyncio.gather(*(client.claim(u, coupon) for u in users))
    report.seconds = time.monotonic() - started
    for answer in answers:
        report.statuses[answer.status] += 1
        report.pending_followed += answer.pending
        report.retried += answer.retries
        report.connection_errors += answer.connection_errors
        report.seen.update(answer.seen)
        if answer.status == 200:
            report.winners.append(answer.user_id)
    verdict = await promises.check(
        http,
        base,
        (promises.Final(a.user_id, a.coupon_name, a.status) for a in answers),
        [coupon],
        seen=report.seen.elements(),
        headers=headers_of(credentials),
    )
    report.coupon_state = verdict.coupons[coupon]
    report.violations.extend(verdict.broken)
    # No fault is injected in a scenario: every request must get an HTTP answer.
    report.check(
        report.connection_errors == 0,
        f"{report.connection_errors} requests got no HTTP answer (connection errors)",
    )
    return report


async def flash_sale(
    http: aiohttp.ClientSession,
    base: str,
    users: int = 50,
    stock: int = 5,
    timeout: float = 60,
    credentials: Credentials | None = None,
) -> ScenarioReport:
    """N different users race for S coupons: exactly S win, the rest are told sold out."""
    names = [f"user_{i:05d}" for i in range(users)]
    report = await _run(http, base, "flash-sale", stock, names, timeout, credentials)
    winners = min(users, stock)
    report.check(report.statuses[200] == winners, f"expected {winners} winners")
    report.check(
        report.statuses[400] == users - winners, f"expected {users - winners} out-of-stock answers"
    )
    return report


async def double_dip(
    http: aiohttp.ClientSession,
    base: str,
    attempts: int = 10,
    stock: int = 100,
    timeout: float = 60,
    credentials: Credentials | None = None,
) -> ScenarioReport:
    """One user claims the same coupon N times at once: one 200, the rest 409."""
    report = await _run(
        http, base, "double-dip", stock, ["user_12345"] * attempts, timeout, credentials
    )
    report.check(report.statuses[200] == 1, "expected exactly one success")
    report.check(report.statuses[409] == attempts - 1, f"expected {attempts - 1} x 409")
    return report


async def run_all(
    base: str,
    burst: int = 2000,
    burst_stock: int = 100,
    credentials: Credentials | None = None,
) -> list[ScenarioReport]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        return [
            await flash_sale(http, base, credentials=credentials),
            await double_dip(http, base, credentials=credentials),
            await flash_sale(http, base, users=burst, stock=burst_stock, credentials=credentials),
        ]
