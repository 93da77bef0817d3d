"""The relay process: wake on the outbox's notifications, publish, prune, stop cleanly.

Any number of relays may run: they share the pending rows through row locks
(relay/relay.py). A relay works while it finds rows, then waits for a notification
(the outbox trigger's NOTIFY, sent at commit) or ``OUTBOX_POLL_SECONDS``, whichever
comes first: the poll only covers what sends no notification (a row whose backoff ran
out, a notification missed while reconnecting). A relay whose rows were all held back
behind another relay's tries again moments later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import psycopg

from flashclaim.core import metrics
from flashclaim.core.db import configure_session
from flashclaim.core.errors import DependencyUnavailable, Stopping
from flashclaim.core.events import NOTIFY_CHANNEL
from flashclaim.core.retry import is_outage
from flashclaim.core.runtime import Runtime
from flashclaim.core.settings import Settings
from relay.relay import EventPublisher, OutboxRelay, RelayPolicy

log = logging.getLogger(__name__)
# How often a working relay logs what it sent.
PROGRESS_SECONDS = 10.0
# How long a relay whose rows were all held back by another's waits before trying again.
HELD_PAUSE_SECONDS = 0.02
# How often the outbox's gauges are read.
SAMPLE_SECONDS = 5.0


class Wakeup:
    """LISTEN on the outbox channel, on a connection of its own (reconnected as needed)."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None

    async def wait(self, timeout: float) -> None:
        """Until a notification or ``timeout``; at once after a (re)connection, since
        notifications sent before it are lost."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, application_name="flashclaim-relay-listen"
                )
                await self._conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                return
            async for _ in self._conn.notifies(timeout=timeout, stop_after=1):
                pass
        except (psycopg.Error, OSError):
            await self.close()
            await asyncio.sleep(min(timeout, 1.0))

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None


async def _configure(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    await configure_session(conn)
    # A SENT mark lost to a crash only repeats an event (relay/relay.py).
    await conn.execute("SET synchronous_commit TO off")
    await conn.commit()


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Relay outbox rows to ``<namespace>.events`` until ``stop`` (SIGTERM, SIGINT).

    Stopping lets the step in hand finish (its confirms are waited for, at most the
    publish timeout), then closes the connections (flashclaim/core/runtime.py); a step
    cut short is rolled back and its rows go out again.
    """
    async with Runtime(settings, "relay", stop) as rt:
        figures = metrics.RelayMetrics(settings.metrics_enabled)
        endpoint = metrics.Endpoint(figures, settings.metrics_host, settings.metrics_port)
        rt.on_exit(endpoint.close, "metrics endpoint")
        pool = await rt.database(1, 2, _configure)
        wakeup = Wakeup(settings.database_url)
        rt.on_exit(wakeup.close, "notification listener")
        connection = await rt.broker()
        publisher = EventPublisher(
            connection, settings.topology(), settings.outbox_events_per_message
        )
        await publisher.open()  # the events exchange exists before any subscriber binds
        relay = OutboxRelay(
            pool,
            publisher,
            RelayPolicy(
                settings.instance_id,
                settings.outbox_batch_size,
                settings.outbox_max_attempts,
                settings.outbox_retry_seconds,
                settings.outbox_retry_max_seconds,
                settings.publish_timeout_seconds,
            ),
            figures,
        )
        log.info(
            "relay started",
            extra={
                "exchange": settings.topology().events_exchange,
                "batch_size": settings.outbox_batch_size,
                "events_per_message": settings.outbox_events_per_message,
            },
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(_relay(relay, wakeup, settings, rt), name="relay")
            tasks.create_task(_prune(relay, settings, rt), name="prune")
            tasks.create_task(metrics.sample_every(SAMPLE_SECONDS, rt.stop, relay.sample))


async def _relay(relay: OutboxRelay, wakeup: Wakeup, settings: Settings, rt: Runtime) -> None:
    stop = rt.stop
    pause = 0.1  # after a fault; doubles up to 2 s while it lasts
    sent = refused = 0
    reported = time.monotonic()
    while not stop.is_set():
        try:
            step = await relay.step()
        except Exception as exc:  # the relay outlives any step: it logs and waits
            if isinstance(exc, DependencyUnavailable):
                log.warning("broker away; events wait", extra={"error": str(exc)})
            elif is_outage(exc):
                log.warning("database unreachable; events wait", extra={"error": repr(exc)})
            else:
                log.exception("relay step failed")
            await rt.pause(pause)
            pause = min(pause * 2, 2.0)
            continue
        pause = 0.1
        sent += step.sent
        refused += step.refused
        if sent + refused and time.monotonic() - reported >= PROGRESS_SECONDS:
            log.info("events relayed", extra={"sent": sent, "refused": refused})
            sent = refused = 0
            reported = time.monotonic()
        if step.held and not step.sent:
            # Behind another relay's rows: they are free again once it commits, which
            # sends no notification.
            await rt.pause(HELD_PAUSE_SECONDS)
        elif step.taken < settings.outbox_batch_size:
            with contextlib.suppress(Stopping):
                await rt.until_stopped(wakeup.wait(settings.outbox_poll_seconds))
            # Woken: let the events of the commits right behind this one join the batch.
            await rt.pause(settings.outbox_linger_ms / 1000)
    if sent + refused:
        log.info("events relayed", extra={"sent": sent, "refused": refused})


async def _prune(relay: OutboxRelay, settings: Settings, rt: Runtime) -> None:
    while not rt.stop.is_set():
        if await rt.pause(settings.outbox_prune_seconds):
            return
        try:
            pruned = await relay.prune(settings.outbox_retention_seconds)
        except (psycopg.Error, OSError) as exc:
            log.warning("outbox not pruned", extra={"error": repr(exc)})
            continue
        if pruned:
            log.info("sent events pruned", extra={"rows": pruned})
