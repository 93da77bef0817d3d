"""One way for a service process to start, hold and let go of what it needs.

The consumer, the relay and the admin API each run inside a :class:`Runtime`:

- what the process opens (a database pool, a Redis client, a broker connection, its
  metrics endpoint, anything else) is registered as it is opened and closed on the way
  out in the reverse order, each close bounded (``CLOSE_SECONDS``: a server that is away
  cannot hold up the exit) and each failure to close logged, never raised over the
  others;
- a stop request (the first SIGTERM or SIGINT, or the caller's event) ends any wait:
  a start-up still waiting for a server gives up (:class:`Stopping`, which the runtime
  absorbs: the process simply ends), a pause ends early (:meth:`Runtime.pause`), and
  the work in hand gets its grace period, then is cancelled (:meth:`Runtime.serve`).

A gateway worker holds its resources in a runtime too, entered by the application's
cleanup context (gateway/app.py): gunicorn's arbiter handles its signals, so its stop
is set when aiohttp shuts the application down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

import redis.asyncio as aioredis
from aio_pika.abc import AbstractRobustConnection
from psycopg_pool import AsyncConnectionPool

from flashclaim.core import broker
from flashclaim.core.db import create_pool, opened
from flashclaim.core.errors import Stopping
from flashclaim.core.results import redis_client
from flashclaim.core.settings import Settings
from flashclaim.core.signals import stop_event_on_signals

log = logging.getLogger(__name__)
T = TypeVar("T")
# The longest any one thing may take to close at exit.
CLOSE_SECONDS = 5.0
# Beyond the grace period, a moment for the last acknowledgements of work that stopped.
SETTLE_SECONDS = 2.0


class Runtime:
    """What one process of ``role`` holds, under ``settings``, until ``stop`` (default:
    the first SIGTERM or SIGINT)."""

    def __init__(self, settings: Settings, role: str, stop: asyncio.Event | None = None) -> None:
        self.settings = settings
        self.role = role
        self._given_stop = stop
        self.stop = stop or asyncio.Event()
        self._exits = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Runtime:
        if self._given_stop is None:
            self.stop = stop_event_on_signals()
        await self._exits.__aenter__()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        await self._exits.aclose()
        if isinstance(exc, Stopping):
            log.info("stopped before start-up finished", extra={"role": self.role})
        log.info(f"{self.role} stopped")
        return isinstance(exc, Stopping)

    # -- what the process holds --------------------------------------------------------

    def on_exit(
        self,
        close: Callable[[], Awaitable[object] | None],
        what: str,
        seconds: float = CLOSE_SECONDS,
    ) -> None:
        """Call ``close`` on the way out (after what is registered later), for at most
        ``seconds``."""

        async def bounded() -> None:
            try:
                done = close()
                if done is not None:
                    await asyncio.wait_for(done, seconds)
            except Exception as exc:  # whatever fails to close, the rest still closes
                log.warning("not closed cleanly", extra={"what": what, "error": repr(exc)})

        self._exits.push_async_callback(bounded)

    async def database(
        self,
        min_size: int,
        max_size: int,
        configure: Callable[[Any], Awaitable[None]] | None = None,
        wait: bool = True,
    ) -> AsyncConnectionPool:
        """A pool of ``min_size`` to ``max_size`` connections, its first ones open (or
        opening in the background: ``wait=False``, for a process that can serve without
        the database)."""
        pool = create_pool(
            self.settings.database_url,
            min_size,
            max_size,
            f"flashclaim-{self.role}-{self.settings.instance_id}",
            *((configure,) if configure is not None else ()),
        )
        self.on_exit(lambda: pool.close(timeout=2.0), "database pool")
        if wait:
            await self.until_stopped(opened(pool))
        else:
            await pool.open(wait=False)
        return pool

    def redis(self) -> aioredis.Redis:
        s = self.settings
        client = redis_client(s.redis_url, s.redis_sentinel_password.get_secret_value())
        self.on_exit(client.aclose, "redis")
        return client

    async def broker(self) -> AbstractRobustConnection:
        """A connection to the broker, waited for (aio-pika restores it if it drops)."""
        connection = await self.until_stopped(
            broker.connect(self.settings.amqp_url, f"{self.role} {self.settings.instance_id}")
        )
        self.on_exit(connection.close, "broker connection")
        return connection

    def background(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task that runs beside the work, cancelled on the way out."""
        task = asyncio.create_task(work, name=name)

        async def cancel() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        self._exits.push_async_callback(cancel)
        return task

    # -- waiting -----------------------------------------------------------------------

    async def until_stopped(self, work: Awaitable[T]) -> T:
        """``work``'s result; :class:`Stopping` (``work`` cancelled) if a stop comes
        first."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise Stopping(f"{self.role} stopped while starting")

    async def pause(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if a stop comes; whether it did."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stop.wait()
        return self.stop.is_set()

    async def serve(self, work: Coroutine[Any, Any, None], grace: float) -> None:
        """Run ``work`` until it ends or a stop comes; then it has ``grace`` seconds (and
        a moment to settle) to finish, and is cancelled after that. Its error, if it
        failed, is raised here."""
        task = asyncio.create_task(work, name=self.role)
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        done, _ = await asyncio.wait({task}, timeout=grace + SETTLE_SECONDS)
        if not done:
            log.warning("grace period over; abandoning the work in hand (it is redelivered)")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            return
        if (error := task.exception()) is not None:
            raise error
