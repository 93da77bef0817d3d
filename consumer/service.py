"""The consumer process: its connections, its workers, and its shutdown."""

from __future__ import annotations

import asyncio
import logging

from consumer.deadletter import DeadLetterer
from consumer.receiver import BatchReceiver
from consumer.worker import ClaimWorker
from flashclaim import broker
from flashclaim.db import create_pool
from flashclaim.results import ResultStore
from flashclaim.results import connect as connect_redis
from flashclaim.settings import Settings
from flashclaim.signals import stop_event_on_signals

log = logging.getLogger(__name__)


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run one consumer until ``stop`` is set (by default: on SIGTERM or SIGINT).

    Shutdown order is the reverse of start-up: stop taking messages, finish the batch
    in hand within the grace period, then close the AMQP channel (returning anything
    unacknowledged to the broker), Redis and finally the database pool.
    """
    stop = stop or stop_event_on_signals()
    topology = settings.topology()
    pool = create_pool(
        settings.database_url,
        settings.db_pool_min_size,
        settings.db_pool_max_size,
        f"flashclaim-consumer-{settings.instance_id}",
    )
    await pool.open(wait=True, timeout=30)
    redis = connect_redis(settings.redis_url)
    connection = await broker.connect(settings.amqp_url, f"consumer {settings.instance_id}")
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=settings.consumer_prefetch)
        declared = await topology.declare(channel)
        mine = [
            p % settings.consumer_count == settings.consumer_index
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
            pool,
            ResultStore(redis, settings.namespace, settings.result_ttl_seconds),
            DeadLetterer(declared.dead_letters, f"consumer {settings.instance_id}"),
            worker_id=settings.instance_id,
            max_attempts=settings.max_attempts,
        )
        log.info(
            "consumer started",
            extra={
                "partitions": [p for p, own in enumerate(mine) if own],
                "prefetch": settings.consumer_prefetch,
                "batch_size": settings.batch_size,
            },
        )
        await worker.run(stop, grace=settings.shutdown_grace_seconds)
    finally:
        await connection.close()
        await redis.aclose()
        await pool.close()
        log.info("consumer stopped")
