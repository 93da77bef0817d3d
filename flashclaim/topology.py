"""RabbitMQ names and their idempotent declaration.

Every process declares the whole topology at start (declaring an existing exchange or
queue with the same arguments is a no-op), so start order does not matter.

    gateway --claim--> <ns>.commands (direct) --> <ns>.claims (quorum, delivery limit)
                                                      | rejected / over the limit
                                                      v
                       <ns>.dlx (direct) --------> <ns>.claims.dlq (quorum)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

CLAIM_ROUTING_KEY = "claim"


@dataclass(frozen=True, slots=True)
class Topology:
    namespace: str
    delivery_limit: int

    @property
    def commands_exchange(self) -> str:
        return f"{self.namespace}.commands"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.dlx"

    @property
    def claims_queue(self) -> str:
        return f"{self.namespace}.claims"

    @property
    def claims_dlq(self) -> str:
        return f"{self.namespace}.claims.dlq"

    def claims_queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.dead_letter_exchange,
            # At-least-once dead-lettering: the broker keeps a message until the DLQ has
            # confirmed it, so a dead letter is never dropped on the way.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    async def declare(self, channel: AbstractChannel) -> Declared:
        """Declare everything (a no-op for what exists already) and return it."""
        dlx = await channel.declare_exchange(
            self.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        dlq = await channel.declare_queue(
            self.claims_dlq,
            durable=True,
            arguments={"x-queue-type": "quorum", "x-overflow": "reject-publish"},
        )
        await dlq.bind(dlx, CLAIM_ROUTING_KEY)
        commands = await channel.declare_exchange(
            self.commands_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await channel.declare_queue(
            self.claims_queue, durable=True, arguments=self.claims_queue_arguments()
        )
        await queue.bind(commands, CLAIM_ROUTING_KEY)
        return Declared(commands, queue, dlx, dlq)


@dataclass(frozen=True, slots=True)
class Declared:
    commands: AbstractExchange
    claims: AbstractQueue
    dead_letters: AbstractExchange
    claims_dlq: AbstractQueue
