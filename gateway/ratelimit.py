"""A per-client token bucket kept in Redis, shared by every gateway process.

No maintained asyncio library offers a Redis token bucket (``limits`` has fixed and
moving windows), and the bucket is one short Lua script that Redis runs atomically.
"""

from __future__ import annotations

import logging
import math

import redis.asyncio as aioredis

from flashclaim.core.errors import DependencyUnavailable, RateLimited
from flashclaim.core.results import redis_faults

log = logging.getLogger(__name__)

# KEYS[1]: the bucket; ARGV: rate (tokens/s), burst (bucket size).
# Returns 0 when allowed, else the milliseconds until a token is available.
_TOKEN_BUCKET = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(state[1]), tonumber(state[2])
if tokens == nil then tokens, ts = burst, now end
tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait
"""


class RateLimiter:
    def __init__(
        self, client: aioredis.Redis, namespace: str, per_second: float, burst: int
    ) -> None:
        self._script = client.register_script(_TOKEN_BUCKET)
        self._prefix = f"{namespace}:ratelimit:"
        self._rate = per_second
        self._burst = burst or max(1, math.ceil(per_second))

    async def check(self, client_id: str) -> None:
        """Raise :class:`RateLimited` when the client has no token left.

        If Redis cannot be reached the request is let through: the limit protects the
        service, and refusing everyone during a Redis outage would not.
        """
        try:
            with redis_faults():
                wait_ms = int(
                    await self._script(
                        keys=[self._prefix + client_id], args=[self._rate, self._burst]
                    )
                )
        except DependencyUnavailable as exc:
            log.warning("rate limit not checked", extra={"error": repr(exc)})
            return
        if wait_ms > 0:
            raise RateLimited(retry_after=math.ceil(wait_ms / 1000))
