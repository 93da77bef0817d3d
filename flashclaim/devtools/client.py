"""An HTTP client for claims that behaves as a careful shop front end should.

Every claim carries an ``Idempotency-Key``, so a retry after a 503, a 429 or a lost
connection is the same claim, applied at most once; a 202 is followed to its final
answer. Used by the scenarios, the load tests and the fault tests.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from flashclaim.devtools.tokens import Credentials, headers_of

FINAL = frozenset({200, 400, 404, 409, 422})


@dataclass
class Answer:
    user_id: str
    coupon_name: str
    status: int  # the final status, or 0 if there was none before the deadline
    body: dict[str, Any]
    retries: int = 0  # 503s, 429s and connection errors retried
    pending: bool = False  # a 202 was followed
    latency: float = 0.0  # seconds from the first attempt to the final answer
    # Every HTTP status received on the way, interim ones included (a 500 retried with
    # the same key would otherwise go unseen), and the connection errors.
    seen: list[int] = field(default_factory=list)
    connection_errors: int = 0
    # Wall-clock times (time.time(), comparable with the servers' clocks on one machine):
    # the first attempt, the final answer's arrival, and each connection error.
    sent_at: float = 0.0
    answered_at: float = 0.0
    connection_errors_at: list[float] = field(default_factory=list)

    @property
    def request_id(self) -> str | None:
        value = self.body.get("request_id")
        return value if isinstance(value, str) else None


async def _body(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The answer's JSON object; anything else (an HTML error page, a JSON list, bytes
    that are not JSON) as ``{"unparsed": <its start>}``, so that its status still counts."""
    raw = await response.read()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        return data
    return {"unparsed": raw[:200].decode("utf-8", "replace")}


# Retries back off exponentially, with full jitter, from FIRST_RETRY up to MAX_BACKOFF
# seconds, and never come sooner than the server's Retry-After. A crowd that retries at
# a fixed interval comes back all at once after an outage: every client refused while
# the broker restarted returns each second, and the recovering service, answering the
# retries of all of them, never catches up with the new claims.
FIRST_RETRY = 0.25
MAX_BACKOFF = 5.0
# A 202 is followed at poll_interval, then at intervals growing by half up to this.
MAX_POLL = 2.0


def retry_delay(retries: int, retry_after: str | None = None) -> float:
    """Seconds before retry number ``retries`` (1 for the first): a random time up to
    ``FIRST_RETRY * 2 ** (retries - 1)`` (at most ``MAX_BACKOFF``), or ``Retry-After``
    (in seconds, at most ``MAX_BACKOFF``) if that is longer."""
    ceiling = min(FIRST_RETRY * 2 ** max(retries - 1, 0), MAX_BACKOFF)
    try:
        floor = min(max(float(retry_after or 0), 0.0), MAX_BACKOFF)
    except ValueError:
        floor = 0.0
    return max(floor, random.uniform(0.0, ceiling))


def poll_delay(first: float, polls: int) -> float:
    """Seconds before following a 202 again, after ``polls`` follow-ups already."""
    return min(first * 1.5**polls, max(first, MAX_POLL))


class ClaimClient:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        base_url: str | Sequence[str],
        deadline: float = 60.0,
        poll_interval: float = 0.2,
        credentials: Credentials | None = None,
        attempt_timeout: float | None = None,
    ) -> None:
        """``base_url``: one gateway, or several: a request that gets no answer (refused,
        reset, or none within ``attempt_timeout``) is sent again to the next, with the
        same key."""
        self._http = http
        self._credentials = credentials
        bases = [base_url] if isinstance(base_url, str) else list(base_url)
        self._bases = [b.rstrip("/") for b in bases]
        self._preferred = 0  # where claims go first: moved on by a request unanswered
        self._deadline = deadline
        self._poll = poll_interval
        self._timeout = (
            aiohttp.ClientTimeout(total=attempt_timeout) if attempt_timeout is not None else None
        )

    async def claim(self, user_id: str, coupon_name: str, key: str | None = None) -> Answer:
        """The claim's final answer, retrying and following 202s until the deadline."""
        token = headers_of(self._credentials, user_id)
        headers = {"Idempotency-Key": key or uuid.uuid4().hex, **token}
        payload = {"user_id": user_id, "coupon_name": coupon_name}
        answer = Answer(user_id, coupon_name, 0, {}, sent_at=time.time())
        started = time.monotonic()
        end = started + self._deadline
        location: str | None = None
        turn = self._preferred  # the gateway asked: the next after a request unanswered
        timeout = self._timeout or self._http.timeout
        polls = 0
        while time.monotonic() < end:
            base = self._bases[turn % len(self._bases)]
            try:
                if location is None:
                    async with self._http.post(
                        f"{base}/api/coupons/claim", json=payload, headers=headers, timeout=timeout
                    ) as r:
                        status, body = r.status, await _body(r)
                        retry_after = r.headers.get("Retry-After")
                        if status == 202:
                            location = r.headers.get("Location")
                            answer.pending = True
                else:
                    async with self._http.get(
                        f"{base}{location}", headers=token, timeout=timeout
                    ) as r:
                        status, body = r.status, await _body(r)
                        retry_after = r.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError):
                # No answer at all (refused, reset, timed out): retried with the same
                # key, and counted, for the caller to judge (scenarios allow none).
                answer.retries += 1
                answer.connection_errors += 1
                answer.connection_errors_at.append(time.time())
                if self._preferred == turn % len(self._bases):
                    self._preferred = (turn + 1) % len(self._bases)
                turn += 1
                # Another gateway at once; the same one again after a backoff.
                if len(self._bases) == 1 or answer.connection_errors >= len(self._bases):
                    await asyncio.sleep(retry_delay(answer.retries))
                continue
            # Every status is recorded as it came, whatever its body: a 500 with an HTML
            # or plain-text page is a server error seen, not a connection error.
            answer.seen.append(status)
            if status == 202 and location is None:
                answer.status, answer.body = status, body  # a 202 without Location
                break
            unseen = status == 404 and body.get("code") == "claim_not_found"
            if status in FINAL and not unseen:
                answer.status, answer.body = status, body
                break
            if status in (429, 503) or status >= 500:
                # Retried with the same key, which is safe; counted, and kept in `seen`.
                answer.retries += 1
                await asyncio.sleep(retry_delay(answer.retries, retry_after))
            else:  # 202 (pending), or a claim not visible yet
                await asyncio.sleep(poll_delay(self._poll, polls))
                polls += 1
        answer.latency = time.monotonic() - started
        answer.answered_at = time.time()
        return answer
