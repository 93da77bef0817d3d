"""Identical concurrent reads share one query, without ever reading stale data.

Plain single flight lets a request join a query that started *before* it arrived, and so
miss a claim its client was already told about. Here a request joins the *next* query
for its key, which starts only once the running one has finished and after every request
that joins it has arrived: each answer reflects at least every write that was
acknowledged before its request came in, and a hot key costs at most one query in flight
(plus one waiting) per process, however many clients read it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class NextFlight(Generic[K, V]):
    def __init__(self, fetch: Callable[[K], Awaitable[V]]) -> None:
        self._fetch = fetch
        self._running: dict[K, asyncio.Future[V]] = {}
        self._next: dict[K, asyncio.Future[V]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, key: K) -> V:
        waiting = self._next.get(key)
        if waiting is None:
            waiting = asyncio.get_running_loop().create_future()
            self._next[key] = waiting
            task = asyncio.create_task(self._launch(key, waiting))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # Shielded: one client going away must not cancel the others' answer.
        return await asyncio.shield(waiting)

    async def _launch(self, key: K, waiting: asyncio.Future[V]) -> None:
        running = self._running.get(key)
        if running is not None:
            await asyncio.wait([running])
        # Requests arriving from here on wait for the query after this one.
        del self._next[key]
        self._running[key] = waiting
        try:
            waiting.set_result(await self._fetch(key))
        except Exception as exc:  # handed over: every waiter raises it
            waiting.set_exception(exc)
            waiting.exception()  # retrieved: every waiter re-raises it from its own await
        finally:
            if self._running.get(key) is waiting:
                del self._running[key]
