"""Connecting to RabbitMQ: a robust connection to one node of a cluster, retried while
the broker starts and moved to another node when its own goes away."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from aio_pika import RobustConnection
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_delay,
)
from tenacity import wait_exponential_jitter as backoff
from yarl import URL

from flashclaim.core.hosts import split_hosts

log = logging.getLogger(__name__)

T = TypeVar("T")

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

# "The broker is away": what an operation on a connection or a channel raises when the
# broker cannot be reached, the connection or channel went away (or is being restored:
# aiormq's ChannelInvalidStateError is a RuntimeError), the broker closed the channel,
# or an answer (a confirm) did not come in time (TimeoutError is an OSError). aio-pika's
# own list: what its robust connection reconnects on. Never the message's or the
# command's fault. The one classification of broker faults in flashclaim.
AWAY: tuple[type[BaseException], ...] = CONNECTION_EXCEPTIONS


def is_away(exc: BaseException) -> bool:
    return isinstance(exc, AWAY)


def retry_while_away() -> AsyncRetrying:
    """Retry a broker operation until the connection is back (aio-pika reconnects by
    itself); the caller bounds it by cancelling."""
    return AsyncRetrying(
        retry=retry_if_exception(is_away),
        wait=backoff(multiplier=0.1, max=2.0, jitter=0.1),
        before_sleep=lambda state: log.warning(
            "broker away; trying again",
            extra={"error": repr(state.outcome.exception()) if state.outcome else None},
        ),
        reraise=True,
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
            except AWAY as exc:
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


async def _close_quietly(connection: AbstractRobustConnection) -> None:
    with contextlib.suppress(Exception):
        await connection.close()


async def connect(url: str, name: str, wait_seconds: float = 60.0) -> AbstractRobustConnection:
    """A connection that reconnects by itself and restores its channels, exchanges,
    queues and consumers. ``url`` may name several nodes of a cluster
    (``amqp://user:pw@host1:5672,host2:5672/``, flashclaim/core/hosts.py): each attempt
    tries them in turn (:class:`ClusterConnection`). The first connection is retried
    for ``wait_seconds``, so a process may start before the broker is up.
    """
    addresses = split_hosts(url)
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(AWAY),
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
            try:
                await connection.connect(timeout=CONNECT_TIMEOUT_SECONDS)
            except BaseException:
                # Closed here, not left to aio-pika's __del__: that schedules close() on
                # whatever loop runs when the object is collected, or, with none
                # running, leaves the coroutine never awaited.
                await asyncio.shield(_close_quietly(connection))
                raise
            return connection
    raise AssertionError("unreachable")  # pragma: no cover


# At most one new channel this often, however many publishes a channel has refused.
RENEW_INTERVAL_SECONDS = 1.0


class PublishingChannel(Generic[T]):
    """A channel with publisher confirms that is replaced after the broker refuses a
    publish (a nack).

    RabbitMQ 3.10 decides once per channel and quorum queue whether the queue takes the
    channel's messages (it registers the channel as an enqueuer on its first publish).
    A channel whose first publish reached a queue that had just lost its leader (a node
    of the cluster killed) is refused by that queue for as long as the channel lives,
    while a new channel is taken at once (tests/acceptance/test_broker_failover.py).

    ``prepare`` declares, on each new channel, what the owner publishes to, and returns
    it (:attr:`target`). The channel is opened on first use, or by :meth:`open`.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        prepare: Callable[[AbstractChannel], Awaitable[T]],
        *,
        on_return_raises: bool = False,
    ) -> None:
        self._connection = connection
        self._prepare = prepare
        self._on_return_raises = on_return_raises
        self._current: tuple[AbstractChannel, T] | None = None
        self._renewing: asyncio.Task[None] | None = None
        self._renewed_at = -math.inf
        self.renewals = 0

    async def open(self) -> tuple[AbstractChannel, T]:
        """The channel and its target, opened now if it is not yet."""
        if self._current is None:
            self._current = await self._new()
        return self._current

    @property
    def target(self) -> T | None:
        """What :meth:`open` prepared on the current channel (``None`` before)."""
        return self._current[1] if self._current is not None else None

    @property
    def current(self) -> tuple[AbstractChannel, T] | None:
        """The current channel and what was prepared on it (``None`` before)."""
        return self._current

    async def _new(self) -> tuple[AbstractChannel, T]:
        channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=self._on_return_raises
        )
        try:
            return channel, await self._prepare(channel)
        except BaseException:
            await channel.close()
            raise

    def refused(self) -> None:
        """The broker refused a publish: replace the channel in the background, unless
        that was done a moment ago (many publishes in flight are refused together)."""
        running = self._renewing is not None and not self._renewing.done()
        if running or time.monotonic() - self._renewed_at < RENEW_INTERVAL_SECONDS:
            return
        self._renewed_at = time.monotonic()
        self._renewing = asyncio.create_task(self.renew(), name="renew publishing channel")

    async def renew(self) -> None:
        """Replace the channel now; the old one is closed, which answers (or fails) what
        was still waiting for a confirm on it."""
        try:
            new = await self._new()
        except AWAY as exc:  # the connection went: it restores the old one
            log.warning("publishing channel not replaced", extra={"error": repr(exc)})
            return
        old, self._current = self._current, new
        self.renewals += 1
        log.warning("publishing channel replaced after the broker refused a publish")
        if old is not None:
            await asyncio.gather(old[0].close(), return_exceptions=True)

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)
        if self._current is not None:
            await self._current[0].close()
            self._current = None
