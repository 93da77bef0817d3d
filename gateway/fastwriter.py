"""Writing the answers the gateway gave by itself to Redis, many to a command.

After a sell-out, losers are answered at HTTP speed (gateway/finals.py); each answer is
also kept briefly in Redis so that ``GET /api/claims/{id}`` finds it. One write per
answer would cost a Redis round trip per request; instead the answers of the last
``linger`` seconds (at most ``max_batch``) go in one command, after the response.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from flashclaim.core.errors import DependencyUnavailable
from flashclaim.core.messages import ClaimResult

log = logging.getLogger(__name__)

Store = Callable[[Sequence[ClaimResult]], Awaitable[None]]


class FastAnswerWriter:
    def __init__(self, store: Store, linger: float = 0.005, max_batch: int = 500) -> None:
        self._store = store
        self._linger = linger
        self._max = max_batch
        self._pending: list[ClaimResult] = []
        self._timer: asyncio.TimerHandle | None = None
        self._writing: set[asyncio.Task[None]] = set()

    def add(self, result: ClaimResult) -> None:
        self._pending.append(result)
        if len(self._pending) >= self._max:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._linger, self._flush)

    async def drain(self) -> None:
        """Write what is pending and wait for every write in progress (shutdown, tests)."""
        self._flush()
        if self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.create_task(self._write(batch))
            self._writing.add(task)
            task.add_done_callback(self._writing.discard)

    async def _write(self, batch: list[ClaimResult]) -> None:
        try:
            await self._store(batch)
        except DependencyUnavailable as exc:  # the answers were given; only the lookup is lost
            log.warning(
                "answers given by the gateway not kept in redis",
                extra={"count": len(batch), "error": repr(exc)},
            )
