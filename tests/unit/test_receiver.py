from __future__ import annotations

from typing import Any, cast

from aio_pika.abc import AbstractIncomingMessage

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
