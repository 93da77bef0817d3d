from __future__ import annotations

from typing import Any, cast

import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import ChannelInvalidStateError
from aiormq.exceptions import AMQPConnectionError

from consumer.receiver import BatchReceiver


async def test_draining_takes_what_is_buffered_without_waiting() -> None:
    """A stopping consumer drains with ``wait=0``: it must get the buffered messages,
    not an empty batch (which made the drain loop spin for the whole grace period)."""
    receiver = BatchReceiver([], batch_size=2, linger=0.0)
    messages = [cast(AbstractIncomingMessage, object()) for _ in range(3)]
    for message in messages:
        await receiver._on_message(message)
    assert receiver.buffered == 3
    assert await receiver.next_batch(wait=0) == messages[:2]
    assert await receiver.next_batch(wait=0) == messages[2:]
    assert await receiver.next_batch(wait=0) == []
    empty: Any = await receiver.next_batch(wait=0.01)
    assert empty == []


class FlakyQueue:
    """A queue whose subscription fails while the connection is being restored."""

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.subscribed = 0

    async def consume(self, callback: object) -> str:
        if self.failures:
            raise self.failures.pop(0)
        self.subscribed += 1
        return "tag"


async def test_a_connection_lost_while_subscribing_is_waited_out() -> None:
    """The broker went away just as the consumer subscribed: it subscribes once the
    connection is back, instead of exiting (seen when a broker restarts at our start)."""
    lost = AMQPConnectionError("Server connection unexpectedly closed")
    queue = FlakyQueue([lost, ChannelInvalidStateError("reconnecting")])
    receiver = BatchReceiver([cast(AbstractQueue, queue)], batch_size=2, linger=0.0)
    await receiver.start()
    assert queue.subscribed == 1


async def test_other_subscription_errors_are_not_retried() -> None:
    queue = FlakyQueue([ValueError("a bug")])
    receiver = BatchReceiver([cast(AbstractQueue, queue)], batch_size=2, linger=0.0)
    with pytest.raises(ValueError, match="a bug"):
        await receiver.start()
