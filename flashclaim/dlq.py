"""Dead-lettered claims: read them without consuming, replay or purge them safely.

Reading ("peeking") subscribes to the dead-letter queue, takes up to ``scan`` messages
without acknowledging them, and closes the channel: every message goes back to the
queue where it was (the broker counts one more delivery, nothing else changes).

Replay republishes a message to its original exchange and routing key with a publisher
confirm, and only after the confirm acknowledges it in the dead-letter queue: at every
moment a message is in the DLQ, or republished, or (if interrupted between the two)
both, never neither. The consumer's inbox makes a message republished twice, or one
that was in fact applied already, a no-op that answers with the recorded result.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import getpass
import logging
import math
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from flashclaim.topology import Topology

audit_log = logging.getLogger("flashclaim.audit")
HEADER = "x-flashclaim-"


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def _time(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, str | bytes):
        try:
            return dt.datetime.fromisoformat(_text(value))
        except ValueError:
            return None
    return None


@dataclass
class DeadLetter:
    """One dead-lettered message, with why it is there decoded from its headers."""

    message_id: str
    body: bytes
    headers: dict[str, Any]
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def death(self) -> dict[str, Any]:
        deaths = self.headers.get("x-death") or []
        return dict(deaths[0]) if deaths else {}

    @property
    def reason(self) -> str:
        return _text(self.headers.get(f"{HEADER}reason")) or _text(self.death.get("reason"))

    @property
    def error_type(self) -> str:
        return _text(self.headers.get(f"{HEADER}error-type"))

    @property
    def error(self) -> str:
        return _text(self.headers.get(f"{HEADER}error"))

    @property
    def payload(self) -> dict[str, Any]:
        try:
            data = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def coupon(self) -> str:
        value = self.payload.get("coupon_name")
        return value if isinstance(value, str) else ""

    @property
    def user(self) -> str:
        value = self.payload.get("user_id")
        return value if isinstance(value, str) else ""

    @property
    def delivery_count(self) -> int:
        attempts = self.headers.get(f"{HEADER}attempts")
        if isinstance(attempts, int):
            return attempts
        count = self.death.get("count")
        return int(count) if isinstance(count, int) else 0

    @property
    def death_times(self) -> list[dt.datetime]:
        times = [_time(d.get("time")) for d in self.headers.get("x-death") or []]
        times.append(_time(self.headers.get(f"{HEADER}failed-at")))
        return sorted(t for t in times if t is not None)

    @property
    def first_death(self) -> dt.datetime | None:
        return self.death_times[0] if self.death_times else None

    @property
    def last_death(self) -> dt.datetime | None:
        return self.death_times[-1] if self.death_times else None

    @property
    def origin(self) -> tuple[str, str]:
        """The exchange and routing key the message was first published to."""
        exchange = _text(self.headers.get(f"{HEADER}original-exchange"))
        key = _text(self.headers.get(f"{HEADER}original-routing-key"))
        if not exchange and self.death:
            exchange = _text(self.death.get("exchange"))
            keys = self.death.get("routing-keys") or []
            key = _text(keys[0]) if keys else ""
        return exchange, key

    def age_seconds(self, now: dt.datetime | None = None) -> float | None:
        first = self.first_death
        if first is None:
            return None
        return ((now or dt.datetime.now(dt.UTC)) - first).total_seconds()

    def summary(self) -> dict[str, Any]:
        first, last = self.first_death, self.last_death
        return {
            "message_id": self.message_id,
            "coupon": self.coupon,
            "user": self.user,
            "reason": self.reason,
            "error_type": self.error_type,
            "error": self.error,
            "delivery_count": self.delivery_count,
            "first_death": first.isoformat() if first else None,
            "last_death": last.isoformat() if last else None,
        }

    def full(self) -> dict[str, Any]:
        exchange, key = self.origin
        return {
            **self.summary(),
            "original_exchange": exchange,
            "original_routing_key": key,
            "properties": self.properties,
            "headers": _jsonable(self.headers),
            "body": self.body.decode(errors="replace"),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def _dead_letter(message: AbstractIncomingMessage) -> DeadLetter:
    return DeadLetter(
        message_id=message.message_id or "",
        body=message.body,
        headers=dict(message.headers or {}),
        properties={
            "content_type": message.content_type,
            "app_id": message.app_id,
            "type": message.type,
            "reply_to": message.reply_to,
            "timestamp": message.timestamp.isoformat() if message.timestamp else None,
        },
    )


def seconds(value: object) -> float:
    """A non-negative, finite number of seconds (``nan`` would match everything)."""
    if isinstance(value, bool):
        raise ValueError("not a number of seconds")
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{value!r} is not a finite, non-negative number of seconds")
    return number


def local_operator() -> str:
    """Who runs this command: the account behind sudo, else the process's account."""
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


@dataclass
class Selection:
    """Which dead letters an operation applies to."""

    message_ids: frozenset[str] = frozenset()
    reason: str | None = None
    coupon: str | None = None
    older_than: float | None = None  # seconds since the first death
    every: bool = False

    def matches(self, letter: DeadLetter) -> bool:
        if self.message_ids and letter.message_id not in self.message_ids:
            return False
        if self.reason and letter.reason != self.reason:
            return False
        if self.coupon and letter.coupon != self.coupon:
            return False
        if self.older_than is not None:
            age = letter.age_seconds()
            if age is None or age < self.older_than:
                return False
        return True

    @property
    def empty(self) -> bool:
        return not (
            self.message_ids
            or self.reason
            or self.coupon
            or self.older_than is not None
            or self.every
        )


class DeadLetters:
    """Operations on one broker's dead-letter queues."""

    def __init__(self, connection: AbstractRobustConnection, topology: Topology) -> None:
        self._connection = connection
        self._topology = topology

    @property
    def queues(self) -> list[str]:
        return [self._topology.claims_dlq]

    async def depth(self, queue: str) -> int:
        async with self._channel() as channel:
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)

    async def peek(self, queue: str, scan: int = 10_000) -> list[DeadLetter]:
        """Up to ``scan`` messages, in queue order, all left in the queue."""
        letters: list[DeadLetter] = []
        async with self._held(queue, scan) as held:
            letters = [_dead_letter(m) for m in held]
        return letters

    async def stats(self, scan: int = 10_000) -> dict[str, Any]:
        out: dict[str, Any] = {}
        now = dt.datetime.now(dt.UTC)
        for queue in self.queues:
            letters = await self.peek(queue, scan)
            ages = [a for a in (x.age_seconds(now) for x in letters) if a is not None]
            out[queue] = {
                "depth": await self.depth(queue),
                "by_reason": dict(Counter(x.reason or "unknown" for x in letters)),
                "by_error_type": dict(Counter(x.error_type or "-" for x in letters)),
                "oldest_age_seconds": round(max(ages), 1) if ages else None,
                "scanned": len(letters),
            }
        return out

    async def replay(
        self,
        selection: Selection,
        *,
        dry_run: bool = False,
        rate: float | None = None,
        scan: int = 10_000,
        on_each: Callable[[DeadLetter], None] | None = None,
        operator: str = "unknown",
    ) -> list[DeadLetter]:
        """Republish every selected message (confirmed), then remove it from the DLQ.
        ``operator`` names who asked, for the audit event."""
        moved: list[DeadLetter] = []
        for queue in self.queues:
            async with self._held(queue, scan) as held:
                publisher = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                try:
                    for message in held:
                        letter = _dead_letter(message)
                        if not selection.matches(letter):
                            continue
                        if not dry_run:
                            await self._republish(publisher, letter)
                            await message.ack()
                            if on_each is not None:
                                on_each(letter)
                            if rate:
                                await asyncio.sleep(1 / rate)
                        moved.append(letter)
                finally:
                    await publisher.close()
        if not dry_run:
            _audit("replay", moved, operator)
        return moved

    async def purge(
        self, selection: Selection, scan: int = 10_000, operator: str = "unknown"
    ) -> list[DeadLetter]:
        removed: list[DeadLetter] = []
        for queue in self.queues:
            async with self._held(queue, scan) as held:
                for message in held:
                    letter = _dead_letter(message)
                    if selection.matches(letter):
                        await message.ack()
                        removed.append(letter)
        _audit("purge", removed, operator)
        return removed

    async def _republish(self, channel: AbstractChannel, letter: DeadLetter) -> None:
        exchange_name, routing_key = letter.origin
        if not exchange_name:
            raise ValueError(f"message {letter.message_id} has no original exchange")
        # A fresh start: no death history, no attempt count; the replay is recorded.
        headers = {
            k: v
            for k, v in letter.headers.items()
            if not (
                k.startswith(HEADER)
                or k in ("x-death", "x-delivery-count")
                or k.startswith("x-first-death")
                or k.startswith("x-last-death")
            )
        }
        replays = letter.headers.get(f"{HEADER}replays")
        headers[f"{HEADER}replays"] = (replays if isinstance(replays, int) else 0) + 1
        headers[f"{HEADER}replayed-at"] = dt.datetime.now(dt.UTC).isoformat()
        exchange = await channel.get_exchange(exchange_name, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                letter.body,
                headers=headers,
                message_id=letter.message_id or None,
                reply_to=letter.properties.get("reply_to"),
                content_type=letter.properties.get("content_type"),
                app_id=letter.properties.get("app_id"),
                type=letter.properties.get("type"),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key,
            mandatory=True,
            timeout=10,
        )

    @asynccontextmanager
    async def _channel(self) -> AsyncIterator[AbstractChannel]:
        channel = await self._connection.channel()
        try:
            yield channel
        finally:
            await channel.close()

    @asynccontextmanager
    async def _held(self, queue: str, scan: int) -> AsyncIterator[list[AbstractIncomingMessage]]:
        """Take up to ``scan`` messages without acking; closing the channel returns the
        ones not acknowledged inside the block, in their places.

        On return, waits (a few seconds at most) until the queue counts them as ready
        again: the broker confirms the channel's close before a quorum queue has put its
        returned messages back, and the next peek sizes itself from the ready count.
        """
        held: list[AbstractIncomingMessage] = []
        depth = 0
        async with self._channel() as channel:
            declared = await channel.declare_queue(queue, passive=True)
            depth = int(declared.declaration_result.message_count or 0)
            want = min(depth, scan)
            if want:
                await channel.set_qos(prefetch_count=want)
                arrived = asyncio.Event()

                async def take(message: AbstractIncomingMessage) -> None:
                    held.append(message)
                    if len(held) >= want:
                        arrived.set()

                tag = await declared.consume(take)
                # Fewer may come than counted (another reader holds some): use what came.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), timeout=10)
                await declared.cancel(tag)
            yield held
        removed = sum(1 for m in held if m.processed)
        if held and removed < len(held):
            await self._settled(queue, depth - removed)

    async def _settled(self, queue: str, ready: int, timeout: float = 3.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._channel() as channel:
            while loop.time() < deadline:
                declared = await channel.declare_queue(queue, passive=True)
                if int(declared.declaration_result.message_count or 0) >= ready:
                    return
                await asyncio.sleep(0.05)


def _audit(action: str, letters: list[DeadLetter], operator: str) -> None:
    audit_log.warning(
        f"dlq {action}",
        extra={
            "audit": True,
            "action": action,
            "operator": operator,
            "count": len(letters),
            "message_ids": [x.message_id for x in letters][:1000],
        },
    )
