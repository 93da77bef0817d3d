"""The promises every run of claims must keep, checked from outside over HTTP.

One checker for every harness: ``flashclaim scenarios``, ``flashclaim loadtest``,
``make bench`` and the acceptance tests (which add checks against the database). Given
each request's final status and the coupons involved, it reads every coupon back and
names each promise with whether it held.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

# A request's final status; 0 when it got none (a connection error, or still 202 at the
# deadline).
NO_ANSWER = 0


@dataclass(frozen=True)
class Final:
    user: str
    coupon: str
    status: int


@dataclass
class Verdict:
    """Each promise by name, whether it held; the coupons as read afterwards."""

    checks: dict[str, bool]
    coupons: dict[str, dict[str, Any]]
    winners: dict[str, list[str]]

    @property
    def ok(self) -> bool:
        return all(self.checks.values())

    @property
    def broken(self) -> list[str]:
        return [name for name, held in self.checks.items() if not held]


async def check(
    http: aiohttp.ClientSession,
    base: str,
    finals: Iterable[Final],
    coupons: Iterable[str],
    seen: Iterable[int] = (),
    headers: Mapping[str, str] | None = None,
) -> Verdict:
    """``seen``: every status received on the way (interim ones included), when known;
    a 5xx among them breaks "no server error" even if a retry then succeeded. (503 is
    the documented answer to an unavailable dependency, and retried.)"""
    finals = list(finals)
    statuses = [f.status for f in finals]
    interim = list(seen)
    winners: dict[str, list[str]] = defaultdict(list)
    for f in finals:
        if f.status == 200:
            winners[f.coupon].append(f.user)
    states: dict[str, dict[str, Any]] = {}
    for name in coupons:
        async with http.get(
            f"{base.rstrip('/')}/api/coupons/{quote(name, safe='')}", headers=headers
        ) as r:
            states[name] = await r.json(content_type=None) if r.status == 200 else {}
    holders = {name: list(s.get("claimed_by", [])) for name, s in states.items()}
    checks = {
        "every request answered finally": all(s not in (NO_ANSWER, 202) for s in statuses),
        "no server error": not any(s >= 500 and s != 503 for s in [*statuses, *interim]),
        "every coupon readable": all(states.values()),
        "claimed_by equals the users told they won": all(
            sorted(holders[n]) == sorted(winners[n]) for n in states
        ),
        "nobody holds a coupon twice": all(len(set(h)) == len(h) for h in holders.values()),
        "nobody told they won twice": all(len(set(w)) == len(w) for w in winners.values()),
        "remaining_amount = amount - claims, never negative": all(
            s.get("remaining_amount") == s.get("amount", 0) - len(holders[n]) >= 0
            for n, s in states.items()
        ),
    }
    return Verdict(checks, states, dict(winners))
