"""Connecting to RabbitMQ: a robust connection to one node of a cluster, retried while
the broker starts and moved to another node when its own goes away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import aiormq
from aio_pika import RobustConnection
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, AMQPError, ChannelInvalidStateError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay
from tenacity import wait_exponential_jitter as backoff
from yarl import URL

from flashclaim.core.hosts import split_hosts

log = logging.getLogger(__name__)

# aio-pika's robust connection makes every attempt, the first and each reconnection,
# through this one method (RobustConnection.__connect_transport, name-mangled): it
# connects to ``self.url``, and nothing else can choose the address per attempt. A
# change of that in aio-pika fails here, at import, rather than by reconnecting to a
# dead node forever (tests/integration/test_broker_cluster.py shows the behaviour).
_ATTEMPT = "_RobustConnection__connect_transport"
if not callable(getattr(RobustConnection, _ATTEMPT, None)):  # pragma: no cover
    raise ImportError(f"aio-pika's RobustConnection has no {_ATTEMPT}: update ClusterConnection")

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


class ClusterConnection(RobustConnection):
    """A robust connection to the first of several brokers (a cluster's nodes) that
    answers. Each attempt tries the addresses in turn, starting with the one after the
    node whose connection was lost (that node is likely down: a refused connection costs
    nothing, a hung one CONNECT_TIMEOUT_SECONDS), until one takes it; the channels,
    queues and consumers are then restored there, as aio-pika restores them on the node
    it lost. An attempt fails only if every address does, and is then repeated after
    the reconnect interval. One address is a plain robust connection."""

    def __init__(self, urls: Sequence[str | URL], **kwargs: Any) -> None:
        if not urls:
            raise ValueError("no broker address")
        self.addresses = tuple(URL(u) for u in urls)
        self._current = 0
        super().__init__(self.addresses[0], **kwargs)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        # The node went away (or the broker closed the connection): start the next
        # attempt with the next node.
        self._current = (self._current + 1) % len(self.addresses)
        await super()._on_connection_close(closing)

    async def _RobustConnection__connect_transport(self) -> None:
        attempt = getattr(super(), _ATTEMPT)
        first = self._current
        for step in range(len(self.addresses)):
            self._current = (first + step) % len(self.addresses)
            self.url = self.addresses[self._current]
            try:
                await attempt()
            except CONNECTION_EXCEPTIONS as exc:
                if step == len(self.addresses) - 1:
                    raise
                log.warning(
                    "broker not reachable; trying the next address",
                    extra={"broker": self._where(), "error": repr(exc)},
                )
            else:
                if len(self.addresses) > 1:
                    log.info("connected to a broker", extra={"broker": self._where()})
                return

    def _where(self) -> str:
        return f"{self.url.host}:{self.url.port}"


async def connect(url: str, name: str, wait_seconds: float = 60.0) -> AbstractRobustConnection:
    """A connection that reconnects by itself and restores its channels, exchanges,
    queues and consumers. ``url`` may name several nodes of a cluster
    (``amqp://user:pw@host1:5672,host2:5672/``, flashclaim/core/hosts.py): each attempt
    tries them in turn (:class:`ClusterConnection`). The first connection is retried
    for ``wait_seconds``, so a process may start before the broker is up.
    """
    addresses = split_hosts(url)
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(CONNECTION_EXCEPTIONS),
        wait=backoff(multiplier=0.2, max=3.0, jitter=0.2),
        stop=stop_after_delay(wait_seconds),
        before_sleep=lambda state: log.warning("broker not reachable yet; retrying"),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            connection = ClusterConnection(
                addresses, client_properties={"connection_name": name}, reconnect_interval=1.0
            )
            await connection.connect(timeout=CONNECT_TIMEOUT_SECONDS)
            return connection
    raise AssertionError("unreachable")  # pragma: no cover
