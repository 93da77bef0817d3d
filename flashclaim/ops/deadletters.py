"""Dead letters for the operators: reading, replaying and purging them safely.

The CLI (ops/dlq_cli.py) and the HTTP API (ops/dlq_api.py) are front ends over
``DeadLetterQueue`` and ``Selection``; the format they read is core/deadletters.py's.

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

import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from flashclaim.core.deadletters import (
    ATTEMPTS,
    ERROR,
    ERROR_TYPE,
    FAILED_AT,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    REASON,
    copy_of,
    properties_of,
    replay_headers,
)
from flashclaim.core.errors import InvalidInput
from flashclaim.core.topology import Topology

operations_log = logging.getLogger("flashclaim.operations")


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
        return _text(self.headers.get(REASON)) or _text(self.death.get("reason"))

    @property
    def error_type(self) -> str:
        return _text(self.headers.get(ERROR_TYPE))

    @property
    def error(self) -> str:
        return _text(self.headers.get(ERROR))

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
        attempts = self.headers.get(ATTEMPTS)
        if isinstance(attempts, int):
            return attempts
        count = self.death.get("count")
        return int(count) if isinstance(count, int) else 0

    @property
    def death_times(self) -> list[dt.datetime]:
        times = [_time(d.get("time")) for d in self.headers.get("x-death") or []]
        times.append(_time(self.headers.get(FAILED_AT)))
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
        exchange = _text(self.headers.get(ORIGINAL_EXCHANGE))
        key = _text(self.headers.get(ORIGINAL_ROUTING_KEY))
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
            "properties": _jsonable(self.properties),
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
        properties=properties_of(message),
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


class BadSelection(InvalidInput):
    """A selection an operator gave that cannot be used; the message says why."""


class NotReplayable(InvalidInput):
    """A selected dead letter names no exchange to go back to."""


@dataclass(frozen=True)
class Selection:
    """Which dead letters an operation applies to."""

    message_ids: frozenset[str] = frozenset()
    reason: str | None = None
    coupon: str | None = None
    older_than: float | None = None  # seconds since the first death
    every: bool = False

    @classmethod
    def of(
        cls,
        message_ids: object = None,
        reason: object = None,
        coupon: object = None,
        older_than: object = None,
        every: object = False,
        *,
        required: bool = False,
    ) -> Selection:
        """A selection from what a front end was given (parsed JSON or command-line
        values), checked: raises :class:`BadSelection` with a message for the operator.
        ``required``: refuse an empty selection (replay and purge must name something)."""
        ids = [] if message_ids is None else message_ids  # false is not "none given"
        if not isinstance(ids, list | tuple | frozenset) or not all(
            isinstance(i, str) for i in ids
        ):
            raise BadSelection("'message_ids' must be a list of strings")
        texts: list[str | None] = []
        for name, value in (("reason", reason), ("coupon", coupon)):
            if value is not None and not isinstance(value, str):
                raise BadSelection(f"'{name}' must be a string")
            texts.append(value or None)
        if older_than is not None:
            if isinstance(older_than, bool) or not isinstance(older_than, int | float | str):
                raise BadSelection("'older_than' must be a number of seconds")
            try:
                older_than = seconds(older_than)
            except ValueError as exc:
                raise BadSelection(f"'older_than': {exc}") from None
        if not isinstance(every, bool):
            raise BadSelection("'all' must be true or false")
        selection = cls(frozenset(ids), texts[0], texts[1], older_than, every)
        if required and selection.empty:
            raise BadSelection("name message ids, a filter (reason, coupon, older_than) or all")
        return selection

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


class DeadLetterQueue:
    """Operations on the dead-letter queue of one broker (cluster)."""

    def __init__(self, connection: AbstractRobustConnection, topology: Topology) -> None:
        self._connection = connection
        self._topology = topology

    @property
    def queue(self) -> str:
        return self._topology.claims_dlq

    async def depth(self) -> int:
        async with self._channel() as channel:
            declared = await channel.declare_queue(self.queue, passive=True)
            return int(declared.declaration_result.message_count or 0)

    async def peek(self, scan: int = 10_000) -> list[DeadLetter]:
        """Up to ``scan`` messages, in queue order, all left in the queue."""
        async with self._held(scan) as held:
            return [_dead_letter(m) for m in held]

    async def select(self, selection: Selection, scan: int = 10_000) -> list[DeadLetter]:
        """The matching dead letters, in queue order, all left in place."""
        return [x for x in await self.peek(scan) if selection.matches(x)]

    async def find(self, message_id: str, scan: int = 10_000) -> DeadLetter | None:
        found = await self.select(Selection(message_ids=frozenset([message_id])), scan)
        return found[0] if found else None

    async def stats(self, scan: int = 10_000) -> dict[str, Any]:
        """The queue's figures, under its name."""
        now = dt.datetime.now(dt.UTC)
        letters = await self.peek(scan)
        ages = [a for a in (x.age_seconds(now) for x in letters) if a is not None]
        return {
            self.queue: {
                "depth": await self.depth(),
                "by_reason": dict(Counter(x.reason or "unknown" for x in letters)),
                "by_error_type": dict(Counter(x.error_type or "-" for x in letters)),
                "oldest_age_seconds": round(max(ages), 1) if ages else None,
                "scanned": len(letters),
            }
        }

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
        async with self._held(scan) as held:
            chosen = [(m, letter) for m in held if selection.matches(letter := _dead_letter(m))]
            # Checked before anything moves: a selection is replayed whole or not at all.
            stranded = [letter.message_id for _, letter in chosen if not letter.origin[0]]
            if stranded:
                raise NotReplayable(
                    f"{len(stranded)} selected message(s) name no exchange to go back to"
                    f" (not dead-lettered by flashclaim): {', '.join(stranded[:5])};"
                    " export or purge them instead"
                )
            publisher = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            try:
                for message, letter in chosen:
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
                # What did move is audited, whatever stopped the rest.
                if not dry_run:
                    _record("replay", moved, operator)
        return moved

    async def purge(
        self, selection: Selection, scan: int = 10_000, operator: str = "unknown"
    ) -> list[DeadLetter]:
        removed: list[DeadLetter] = []
        async with self._held(scan) as held:
            for message in held:
                letter = _dead_letter(message)
                if selection.matches(letter):
                    await message.ack()
                    removed.append(letter)
        _record("purge", removed, operator)
        return removed

    async def _republish(self, channel: AbstractChannel, letter: DeadLetter) -> None:
        exchange_name, routing_key = letter.origin
        if not exchange_name:
            raise ValueError(f"message {letter.message_id} has no original exchange")
        exchange = await channel.get_exchange(exchange_name, ensure=False)
        copy = copy_of(
            letter.message_id, letter.body, replay_headers(letter.headers), letter.properties
        )
        await exchange.publish(copy, routing_key, mandatory=True, timeout=10)

    @asynccontextmanager
    async def _channel(self) -> AsyncIterator[AbstractChannel]:
        channel = await self._connection.channel()
        try:
            yield channel
        finally:
            await channel.close()

    @asynccontextmanager
    async def _held(self, scan: int) -> AsyncIterator[list[AbstractIncomingMessage]]:
        """Take up to ``scan`` messages without acking; closing the channel returns the
        ones not acknowledged inside the block, in their places.

        On return, waits (a few seconds at most) until the queue counts them as ready
        again: the broker confirms the channel's close before a quorum queue has put its
        returned messages back, and the next peek sizes itself from the ready count.
        """
        held: list[AbstractIncomingMessage] = []
        depth = 0
        async with self._channel() as channel:
            declared = await channel.declare_queue(self.queue, passive=True)
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
            await self._settled(depth - removed)

    async def _settled(self, ready: int, timeout: float = 3.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._channel() as channel:
            while loop.time() < deadline:
                declared = await channel.declare_queue(self.queue, passive=True)
                if int(declared.declaration_result.message_count or 0) >= ready:
                    return
                await asyncio.sleep(0.05)


def _record(action: str, letters: list[DeadLetter], operator: str) -> None:
    """The operations log: who replayed or purged what (an audit event)."""
    operations_log.warning(
        f"dlq {action}",
        extra={
            "audit": True,
            "action": action,
            "operator": operator,
            "count": len(letters),
            "message_ids": [x.message_id for x in letters][:1000],
        },
    )
