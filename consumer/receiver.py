"""Receiving commands from RabbitMQ and cutting them into micro-batches."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from flashclaim.core.broker import retry_while_away


class BatchReceiver:
    """Buffers deliveries (at most the channel's prefetch) and hands them out in batches.

    A batch is whatever has arrived, up to ``batch_size``; when fewer are waiting, it
    lingers ``linger`` seconds for more. Under load batches fill up by themselves while
    the previous one is being applied.

    It subscribes to its ``own`` partition queues at once and to the ``standby`` ones
    after ``standby_delay``: on a single-active-consumer queue the first subscriber is the
    active one, so each consumer ends up active on its own partitions and ready to take
    over the others when their consumer goes away.
    """

    def __init__(
        self,
        own: Sequence[AbstractQueue],
        batch_size: int,
        linger: float,
        standby: Sequence[AbstractQueue] = (),
        standby_delay: float = 0.0,
    ) -> None:
        self._own = list(own)
        self._standby = list(standby)
        self._standby_delay = standby_delay
        self._batch_size = batch_size
        self._linger = linger
        self._buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._tags: list[tuple[AbstractQueue, str]] = []
        self._later: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._subscribe(self._own)
        if self._standby:
            self._later = asyncio.create_task(self._subscribe_later())

    async def _subscribe_later(self) -> None:
        await asyncio.sleep(self._standby_delay)
        await self._subscribe(self._standby)

    async def _subscribe(self, queues: Sequence[AbstractQueue]) -> None:
        # The connection may drop while subscribing (a broker restart just after ours):
        # wait for it to come back and subscribe then, rather than fail the consumer.
        for queue in queues:
            async for attempt in retry_while_away():
                with attempt:
                    self._tags.append((queue, await queue.consume(self._on_message)))

    async def stop(self) -> None:
        """Stop new deliveries; what is buffered stays available to ``next_batch``.

        Messages already delivered stay unacknowledged, held by this consumer: the
        broker neither redelivers them nor sends more until ``start`` is called again.
        """
        if self._later is not None:
            self._later.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._later
            self._later = None
        tags, self._tags = self._tags, []
        for queue, tag in tags:
            await queue.cancel(tag)

    @property
    def buffered(self) -> int:
        return self._buffer.qsize()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._buffer.put_nowait(message)

    async def next_batch(self, wait: float) -> list[AbstractIncomingMessage]:
        """Up to ``batch_size`` messages in delivery order; ``[]`` if none came in ``wait``.

        ``wait=0`` takes only what is buffered already. (``asyncio.wait_for(get(), 0)``
        would not: it times out before the getter has even run.)
        """
        try:
            if wait <= 0:
                first = self._buffer.get_nowait()
            else:
                first = await asyncio.wait_for(self._buffer.get(), wait)
        except (TimeoutError, asyncio.QueueEmpty):
            return []
        batch = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._linger
        while len(batch) < self._batch_size:
            try:
                batch.append(self._buffer.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._buffer.get(), left))
            except TimeoutError:
                break
        return batch
