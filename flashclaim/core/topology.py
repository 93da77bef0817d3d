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
    # The bodies a partition queue holds at most; past it the broker refuses a publish
    # (overflow reject-publish) and the gateway answers 503.
    max_bytes: int = 64 * 1024 * 1024

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
        (events,) = [e for e in self.exchanges() if e.name == self.events_exchange]
        return await channel.declare_exchange(events.name, events.type, durable=True)

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

    # The topology, described once: declared from here by every process (:meth:`declare`)
    # and written from here for brokers set up beforehand (policies.definitions: Compose's
    # definitions file, the Kubernetes resources).

    def exchanges(self) -> list[Exchange]:
        return [
            Exchange(self.dead_letter_exchange, "fanout"),
            Exchange(self.commands_exchange, "x-consistent-hash"),
            Exchange(self.events_exchange, "topic"),
        ]

    def queues(self) -> list[Queue]:
        # No single active consumer on the DLQ: operators peek at it while it is
        # consumed. Its overflow and delivery limit are a policy as well.
        return [
            Queue(self.claims_dlq, {"x-queue-type": "quorum"}),
            *(Queue(name, self.claims_queue_arguments()) for name in self.claims_queues),
        ]

    def bindings(self) -> list[Binding]:
        return [
            Binding(self.dead_letter_exchange, self.claims_dlq, ""),
            *(Binding(self.commands_exchange, name, WEIGHT) for name in self.claims_queues),
        ]

    async def declare(self, channel: AbstractChannel) -> Declared:
        """Declare everything (a no-op for what exists already) and return it."""
        exchanges = {
            e.name: await channel.declare_exchange(e.name, e.type, durable=True)
            for e in self.exchanges()
        }
        queues = {
            q.name: await channel.declare_queue(q.name, durable=True, arguments=q.arguments)
            for q in self.queues()
        }
        for b in self.bindings():
            await queues[b.queue].bind(exchanges[b.exchange], b.routing_key)
        return Declared(
            exchanges[self.commands_exchange],
            [queues[name] for name in self.claims_queues],
            exchanges[self.dead_letter_exchange],
            queues[self.claims_dlq],
        )


@dataclass(frozen=True, slots=True)
class Exchange:
    name: str
    type: str  # the AMQP exchange type: fanout, topic, x-consistent-hash (a plugin's)


@dataclass(frozen=True, slots=True)
class Queue:
    name: str
    arguments: dict[str, Any]  # durable, never auto-deleted


@dataclass(frozen=True, slots=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str


@dataclass(frozen=True, slots=True)
class Declared:
    commands: AbstractExchange
    claims: list[AbstractQueue]
    dead_letters: AbstractExchange
    claims_dlq: AbstractQueue
