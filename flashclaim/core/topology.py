"""RabbitMQ names and their idempotent declaration.

Every process declares the whole topology at start (declaring an existing exchange or
queue with the same arguments is a no-op), so start order does not matter.

    gateway --claim, routing key = coupon name-->  <ns>.claims  (x-consistent-hash)
                                                       |  hash(coupon) picks one of P
                       +---------------+---------------+
                       v               v               v
                  <ns>.claims.0   <ns>.claims.1 ...  <ns>.claims.P-1   quorum queues,
                       |   single active consumer each: one consumer at a time applies a
                       |   coupon's claims, in order; delivery limit (a policy) as a backstop
                       |  rejected / over the limit / moved by a consumer
                       v
                  <ns>.claims.dlx (fanout) -----> <ns>.claims.dlq (quorum)

A coupon always hashes to the same partition, so its claims queue up in one place and
reach the consumer in arrival order, ready to be applied in batches under one row lock.

    relay --event, routing key = event type-->  <ns>.events  (topic, durable)
                                                    |  bound by each subscriber's own queue
                                                    v  (e.g. "coupon.#", "coupon.sold_out")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

# Routing key of dead letters the consumer publishes (the fanout exchange ignores it).
CLAIM_ROUTING_KEY = "claim"
# Each partition queue's weight on the consistent-hash exchange.
WEIGHT = "1"


@dataclass(frozen=True, slots=True)
class Topology:
    namespace: str
    delivery_limit: int
    partitions: int = 4

    @property
    def commands_exchange(self) -> str:
        return f"{self.namespace}.claims"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.claims.dlx"

    @property
    def events_exchange(self) -> str:
        return f"{self.namespace}.events"

    async def declare_events(self, channel: AbstractChannel) -> AbstractExchange:
        """The exchange the outbox relay publishes events to (subscribers bind to it)."""
        return await channel.declare_exchange(
            self.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )

    def claims_queue(self, partition: int) -> str:
        return f"{self.namespace}.claims.{partition}"

    @property
    def claims_queues(self) -> list[str]:
        return [self.claims_queue(p) for p in range(self.partitions)]

    @property
    def claims_dlq(self) -> str:
        return f"{self.namespace}.claims.dlq"

    def claims_queue_arguments(self) -> dict[str, Any]:
        """Only what can never change: limits and dead-lettering are policies
        (flashclaim/core/policies.py), since a queue's arguments are fixed for its life."""
        return {"x-queue-type": "quorum", "x-single-active-consumer": True}

    async def declare(self, channel: AbstractChannel) -> Declared:
        """Declare everything (a no-op for what exists already) and return it."""
        dlx = await channel.declare_exchange(
            self.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        # No single active consumer on the DLQ: operators peek at it while it is
        # consumed. Its overflow and delivery limit are a policy as well.
        dlq = await channel.declare_queue(
            self.claims_dlq, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dlq.bind(dlx, "")
        commands = await channel.declare_exchange(
            self.commands_exchange, "x-consistent-hash", durable=True
        )
        queues = []
        for name in self.claims_queues:
            queue = await channel.declare_queue(
                name, durable=True, arguments=self.claims_queue_arguments()
            )
            await queue.bind(commands, WEIGHT)
            queues.append(queue)
        return Declared(commands, queues, dlx, dlq)


@dataclass(frozen=True, slots=True)
class Declared:
    commands: AbstractExchange
    claims: list[AbstractQueue]
    dead_letters: AbstractExchange
    claims_dlq: AbstractQueue
