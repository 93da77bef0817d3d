"""Claim results in Redis: stored under the request id, and pushed to the waiting gateway.

Keys (``<ns>`` is the namespace setting):

- ``<ns>:result:<request_id>``: the final result, JSON, with a TTL;
- ``<ns>:pending:<request_id>``: set when a client was answered 202, until the result lands;
- ``<ns>:gateway:<request_id>``: an answer the gateway gave itself, without a round trip
  (final, so it is never overwritten), kept ``gateway_answer_ttl_seconds``; the release
  before wrote these under ``<ns>:fast:``, still read for as long as they can live;
- ``<ns>:idem:<request_id>``: the claim an Idempotency-Key was first used for;
- ``<ns>:replies:<gateway instance>``: the pub/sub channel one gateway listens on.
"""

from __future__ import annotations

import contextlib
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.sentinel import Sentinel

from flashclaim.core.errors import DependencyUnavailable
from flashclaim.core.hosts import split_hosts
from flashclaim.core.messages import ClaimResult, uuid_text

# KEYS: the result keys. ARGV: the TTL, n, the n values (one a key), then pairs of
# (channel, message).
_STORE_AND_PUBLISH = """
local ttl, n = ARGV[1], tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[2 + i], 'EX', ttl)
end
for i = 3 + n, #ARGV, 2 do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return n
"""

# KEYS: the keys. ARGV: the TTL, then one value a key, each set only if the key is new.
_STORE_NEW = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[1 + i], 'EX', ARGV[1], 'NX')
end
return #KEYS
"""

# KEYS: the result, the gateway's answer, the legacy gateway answer, the fingerprint.
# ARGV: the claim, the TTL. {1, answer} if there is one; else {0, the claim recorded for
# the id}, recording ARGV[1] if none was.
_RECALL = """
for i = 1, 3 do
  local answer = redis.call('GET', KEYS[i])
  if answer then return {1, answer} end
end
redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[2], 'NX')
return {0, redis.call('GET', KEYS[4])}
"""

SENTINEL_SCHEME = "redis+sentinel"


@contextlib.contextmanager
def redis_faults() -> Iterator[None]:
    """Any Redis fault as ``DependencyUnavailable("redis")``: the server unreachable or
    restarting, a timeout, a write refused (memory full, a replica), no master known to
    Sentinel. Callers decide what a missing Redis means for them; none of them needs to
    know which it was (the original is the exception's cause, for the logs)."""
    try:
        yield
    except (redis.exceptions.RedisError, OSError) as exc:
        raise DependencyUnavailable("redis", repr(exc)) from exc


@dataclass(frozen=True, slots=True)
class SentinelAddress:
    """``redis+sentinel://[[user]:password@]host:port[,host:port...]/master[/db]``: the
    Sentinels to ask, the name of the master they watch, and the database."""

    sentinels: list[tuple[str, int]]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelAddress:
        each = [urllib.parse.urlsplit(u) for u in split_hosts(url)]  # one URL per Sentinel
        parts = [p for p in each[0].path.split("/") if p]
        if not parts or not all(u.hostname for u in each):
            raise ValueError(f"not a {SENTINEL_SCHEME} URL (host:port,.../master[/db]): {url!r}")
        return cls(
            [(str(u.hostname), u.port or 26379) for u in each],
            urllib.parse.unquote(parts[0]),
            int(parts[1]) if len(parts) > 1 else 0,
            urllib.parse.unquote(each[0].username or "") or None,
            urllib.parse.unquote(each[0].password or "") or None,
        )


class _SentinelMaster(aioredis.Redis):
    """The master's client, closing the Sentinels' own connections with its own."""

    watchers: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.watchers is not None:
            for client in self.watchers.sentinels:
                await client.aclose()


def redis_client(
    url: str, sentinel_password: str = "", max_connections: int = 64
) -> aioredis.Redis:
    """A Redis client whose requests wait (up to 2 s) for a free connection.

    The default pool refuses outright once it has opened its maximum of connections,
    which under a burst of claims turns into needless failures. A ``redis+sentinel://``
    URL asks Sentinel for the master, and again after a failover (the pool then
    reconnects to the new master); the Sentinels take ``sentinel_password`` if given,
    else the URL's password (the Sentinels know no ACL user: only a password).
    """
    if url.startswith(f"{SENTINEL_SCHEME}://"):
        address = SentinelAddress.parse(url)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            address.sentinels,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            sentinel_kwargs=(
                {"password": sentinel_password or address.password}
                if sentinel_password or address.password
                else None
            ),
        )
        master: _SentinelMaster = sentinel.master_for(
            address.master,
            redis_class=_SentinelMaster,
            db=address.db,
            username=address.username,
            password=address.password,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            max_connections=max_connections,
        )
        master.watchers = sentinel
        return master
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=2.0,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
    )
    return aioredis.Redis.from_pool(pool)


@dataclass(frozen=True, slots=True)
class ResultStore:
    """The Redis keys of claim results (see the module docstring), over one client.

    ``gateway_answer_ttl_seconds`` bounds answers the gateway gave itself (default:
    ``ttl_seconds``).
    """

    redis: aioredis.Redis
    namespace: str
    ttl_seconds: int
    gateway_answer_ttl_seconds: int | None = None

    def result_key(self, request_id: uuid.UUID) -> str:
        return f"{self.namespace}:result:{uuid_text(request_id)}"

    def pending_key(self, request_id: uuid.UUID) -> str:
        return f"{self.namespace}:pending:{uuid_text(request_id)}"

    def gateway_answer_key(self, request_id: uuid.UUID) -> str:
        return f"{self.namespace}:gateway:{uuid_text(request_id)}"

    def legacy_gateway_answer_key(self, request_id: uuid.UUID) -> str:
        """Where the release before kept the gateway's answers (read, never written:
        they expire within GATEWAY_ANSWER_TTL_SECONDS of the upgrade)."""
        return f"{self.namespace}:fast:{uuid_text(request_id)}"

    def fingerprint_key(self, request_id: uuid.UUID) -> str:
        return f"{self.namespace}:idem:{uuid_text(request_id)}"

    def reply_channel(self, instance_id: str) -> str:
        return f"{self.namespace}:replies:{instance_id}"

    async def publish(self, results: Iterable[tuple[ClaimResult, str | None]]) -> None:
        """Store each result, and push each gateway its results in one message.

        One command for the whole batch (a server-side script: a SET per result, then a
        PUBLISH per waiting gateway carrying a JSON list of that gateway's results), so
        a batch costs one round trip and one reply to parse, whatever its size.
        """
        with redis_faults():
            keys: list[str] = []
            values: list[bytes] = []
            by_channel: dict[str, list[bytes]] = {}
            for result, reply_to in results:
                raw = result.dumps()
                keys.append(self.result_key(result.request_id))
                values.append(raw)
                if reply_to:
                    by_channel.setdefault(reply_to, []).append(raw)
            if not keys:
                return
            messages = [
                m for c, raws in by_channel.items() for m in (c, b"[" + b",".join(raws) + b"]")
            ]
            await self.redis.eval(
                _STORE_AND_PUBLISH,
                len(keys),
                *keys,
                self.ttl_seconds,
                len(values),
                *values,
                *messages,
            )

    async def store_gateway_answers(self, results: Sequence[ClaimResult]) -> None:
        """Keep answers given without a round trip (one command for all), each unless its
        id has one already."""
        with redis_faults():
            if not results:
                return
            await self.redis.eval(
                _STORE_NEW,
                len(results),
                *(self.gateway_answer_key(r.request_id) for r in results),
                self.gateway_answer_ttl_seconds or self.ttl_seconds,
                *(r.dumps() for r in results),
            )

    async def get(self, request_id: uuid.UUID) -> ClaimResult | None:
        """The consumer's result, else an answer the gateway gave by itself."""
        with redis_faults():
            raw_result, raw_gateway, raw_legacy = await self.redis.mget(
                self.result_key(request_id),
                self.gateway_answer_key(request_id),
                self.legacy_gateway_answer_key(request_id),
            )
            raw = next((r for r in (raw_result, raw_gateway, raw_legacy) if r is not None), None)
            return None if raw is None else ClaimResult.loads(raw)

    async def recall(self, request_id: uuid.UUID, claim: bytes) -> ClaimResult | bytes:
        """What a request id stands for, in one round trip: its answer if it has one (as
        :meth:`get`); else the claim recorded for it, recording ``claim`` if none was
        (then ``claim`` itself). A keyed claim is looked up and its key taken at once:
        in a crowd of retries after an outage, each costs one command."""
        with redis_faults():
            found, raw = await self.redis.eval(
                _RECALL,
                4,
                self.result_key(request_id),
                self.gateway_answer_key(request_id),
                self.legacy_gateway_answer_key(request_id),
                self.fingerprint_key(request_id),
                claim,
                self.ttl_seconds,
            )
            return ClaimResult.loads(raw) if found else bytes(raw)

    async def mark_pending(self, request_id: uuid.UUID, user_id: str) -> None:
        """Remember a claim answered ``202`` (and whose it is) until its result comes."""
        with redis_faults():
            await self.redis.set(
                self.pending_key(request_id), user_id.encode(), ex=self.ttl_seconds
            )

    async def pending_owner(self, request_id: uuid.UUID) -> str | None:
        """The user of a claim marked pending, or ``None``."""
        with redis_faults():
            raw = await self.redis.get(self.pending_key(request_id))
            if raw is None:
                return None
            # "1": a mark made before the user was kept in it, owner unknown.
            text = raw.decode() if isinstance(raw, bytes) else raw
            return "" if text == "1" else text
