"""Connecting to RabbitMQ: a robust connection, retried while the broker starts."""

from __future__ import annotations

import logging

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, AMQPError, ChannelInvalidStateError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay
from tenacity import wait_exponential_jitter as backoff

log = logging.getLogger(__name__)

# Bound of one connection attempt, reconnections included: a broker that accepts the TCP
# connection but never completes the AMQP handshake (one still booting, recovering its
# queues) would otherwise hold the attempt, and the reconnection, forever.
CONNECT_TIMEOUT_SECONDS = 10.0

# What a publish with confirms raises when the broker could not take it: the connection
# or channel went away, or the confirm did not come in time. Not the message's fault.
PUBLISH_FAILURES: tuple[type[BaseException], ...] = (
    AMQPError,
    aiormq.exceptions.AMQPError,
    ChannelInvalidStateError,
    ConnectionError,
    TimeoutError,
    RuntimeError,
)


def is_up(connection: AbstractRobustConnection) -> bool:
    """Whether the connection can carry anything now. A robust connection that lost its
    broker is not "closed" while it reconnects: its ``connected`` event says it."""
    return not connection.is_closed and connection.connected.is_set()


async def connect(url: str, name: str, wait_seconds: float = 60.0) -> AbstractRobustConnection:
    """A connection that reconnects by itself and restores its channels, exchanges,
    queues and consumers. The first connection is retried for ``wait_seconds``, so a
    process may start before the broker is up.
    """
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(CONNECTION_EXCEPTIONS),
        wait=backoff(multiplier=0.2, max=3.0, jitter=0.2),
        stop=stop_after_delay(wait_seconds),
        before_sleep=lambda state: log.warning("broker not reachable yet; retrying"),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await aio_pika.connect_robust(
                url,
                client_properties={"connection_name": name},
                reconnect_interval=1.0,
                timeout=CONNECT_TIMEOUT_SECONDS,
            )
    raise AssertionError("unreachable")  # pragma: no cover
