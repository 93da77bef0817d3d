"""The consumer process: its connections, its workers, and its shutdown."""

from __future__ import annotations

import asyncio
import logging

from psycopg_pool import AsyncConnectionPool

from consumer.dlq_publisher import DeadLetterPublisher
from consumer.receiver import BatchReceiver
from consumer.reporter import Reporter
from consumer.retention import InboxPruner
from consumer.slots import ConsumerSlot
from consumer.store import ClaimStore
from consumer.worker import ClaimWorker
from flashclaim.core import metrics
from flashclaim.core.db import queries
from flashclaim.core.policies import apply_configured
from flashclaim.core.results import ResultStore
from flashclaim.core.runtime import Runtime
from flashclaim.core.settings import Settings

log = logging.getLogger(__name__)
# How often the gauges no event updates (pool, FAILED inbox rows) are read.
SAMPLE_SECONDS = 5.0


async def _count_failed(pool: AsyncConnectionPool, figures: metrics.ConsumerMetrics) -> None:
    if not figures.enabled:
        return
    async with pool.connection(timeout=2.0) as conn:
        cur = await conn.execute(queries()["inbox_failed_count"])
        row = await cur.fetchone()
    figures.inbox_failed.set(row[0] if row else 0)


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run one consumer until ``stop`` is set (by default: on SIGTERM or SIGINT).

    Shutdown is bounded by the grace period in every state, servers reachable or not
    (flashclaim/core/runtime.py):

    1. ``stop`` is set: no new deliveries are taken (a start-up still waiting for a
       server gives up at once);
    2. the batches in hand are finished, reported and acknowledged within
       ``SHUTDOWN_GRACE_SECONDS``; whatever is still running then is cancelled;
    3. the AMQP connection closes (anything unacknowledged returns to the queue), then
       Redis, then the database pool, each given a few seconds at most.
    """
    topology = settings.topology()
    async with Runtime(settings, "consumer", stop) as rt:
        figures = metrics.ConsumerMetrics(settings.metrics_enabled)
        endpoint = metrics.Endpoint(figures, settings.metrics_host, settings.metrics_port)
        rt.on_exit(endpoint.close, "metrics endpoint")
        pool = await rt.database(settings.db_pool_min_size, settings.db_pool_max_size)
        redis = rt.redis()
        connection = await rt.broker()
        # Limits and dead-lettering first, so that queues declared next have them.
        await apply_configured(settings)
        # on_return_raises: a dead letter no queue took is an error (dlq_publisher.py).
        channel = await connection.channel(on_return_raises=True)
        await channel.set_qos(prefetch_count=settings.consumer_prefetch)
        declared = await topology.declare(channel)
        index: int | None
        if isinstance(settings.consumer_index, int):
            index = settings.consumer_index
        else:  # "auto": a slot no running consumer holds
            slot = ConsumerSlot(settings.database_url, settings.namespace, settings.consumer_count)
            rt.on_exit(slot.release, "consumer slot")
            index = await slot.take()
        mine = [
            index is not None and p % settings.consumer_count == index
            for p in range(topology.partitions)
        ]
        receiver = BatchReceiver(
            [q for q, own in zip(declared.claims, mine, strict=True) if own],
            settings.batch_size,
            settings.batch_linger_ms / 1000,
            standby=[q for q, own in zip(declared.claims, mine, strict=True) if not own],
            standby_delay=settings.standby_delay_seconds,
        )
        worker = ClaimWorker(
            receiver,
            ClaimStore(pool, settings.instance_id, settings.max_attempts),
            Reporter(ResultStore(redis, settings.namespace, settings.result_ttl_seconds)),
            DeadLetterPublisher(
                declared.dead_letters,
                f"consumer {settings.instance_id}",
                repair=lambda: topology.declare(channel),
            ),
            settings.batch_size,
            figures,
        )
        figures.partitions.labels("active").set(sum(mine))
        figures.partitions.labels("standby").set(len(mine) - sum(mine))
        rt.background(
            metrics.sample_every(
                SAMPLE_SECONDS,
                rt.stop,
                lambda: figures.sample_pool(pool.get_stats()),
                lambda: _count_failed(pool, figures),
            ),
            "metrics",
        )
        pruner = InboxPruner(pool, settings.inbox_retention_seconds, settings.inbox_prune_batch)
        rt.background(pruner.run(settings.inbox_prune_seconds, rt.pause), "inbox prune")
        log.info(
            "consumer started",
            extra={
                "partitions": [p for p, own in enumerate(mine) if own],
                "prefetch": settings.consumer_prefetch,
                "batch_size": settings.batch_size,
            },
        )
        grace = settings.shutdown_grace_seconds
        await rt.serve(worker.run(rt.stop, grace=grace), grace)
