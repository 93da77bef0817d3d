"""Receiving commands from RabbitMQ and cutting them into micro-batches."""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue


class BatchReceiver:
    """Buffers deliveries (at most the channel's prefetch) and hands them out in batches.

    A batch is whatever has arrived, up to ``batch_size``; when fewer are waiting, it
    lingers ``linger`` seconds for more. Under load batches fill up by themselves while
    the previous one is being applied.
    """

    def __init__(self, queue: AbstractQueue, batch_size: int, linger: float) -> None:
        self._queue = queue
        self._batch_size = batch_size
        self._linger = linger
        self._buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._consumer_tag: str | None = None

    async def start(self) -> None:
        self._consumer_tag = await self._queue.consume(self._on_message)

    async def stop(self) -> None:
        """Stop new deliveries; what is buffered stays available to ``next_batch``.

        Messages already delivered stay unacknowledged, held by this consumer: the
        broker neither redelivers them nor sends more until ``start`` is called again.
        """
        if self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            await self._queue.cancel(tag)

    @property
    def consuming(self) -> bool:
        return self._consumer_tag is not None

    @property
    def buffered(self) -> int:
        return self._buffer.qsize()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._buffer.put_nowait(message)

    async def next_batch(self, wait: float) -> list[AbstractIncomingMessage]:
        """Up to ``batch_size`` messages in delivery order; ``[]`` if none came in ``wait``."""
        try:
            first = await asyncio.wait_for(self._buffer.get(), wait)
        except TimeoutError:
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
