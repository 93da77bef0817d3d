"""The consumer's acknowledgement protocol (consumer/worker.py), with fake messages.

The servers are stood in for by objects that record what was done to them: a channel
that settles deliveries as RabbitMQ does (an ``ack(multiple=True)`` settles every earlier
delivery still unsettled), an inbox with the store's semantics, a dead-letter queue that
can refuse, and a result store. The real servers are in tests/integration/test_consumer.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from consumer.decide import decide
from consumer.dlq_publisher import DeadLetterPublisher
from consumer.receiver import BatchReceiver
from consumer.reporter import Reporter
from consumer.store import Attempts, BatchOutcome, ClaimStore, Delivery
from consumer.worker import ClaimWorker
from flashclaim.core.messages import ClaimCommand, ClaimResult, Outcome, encode_claims

COUPON = "SALE"
MAX_ATTEMPTS = 3


class Channel:
    """Delivery tags in order, and what settled each (``None``: not yet). Every event
    (a settlement, a commit, a report) goes to one ``log``, in the order it happened."""

    def __init__(self) -> None:
        self.settled: dict[int, str | None] = {}
        self.log: list[str] = []
        self.acks: list[int] = []  # the tag of each ack sent
        self.closed = False

    def settle(self, tag: int, how: str, multiple: bool = False) -> None:
        if self.closed:
            raise ConnectionError("channel closed")
        if how == "ack":
            self.acks.append(tag)
        if self.settled[tag] is not None:
            raise AssertionError(f"delivery {tag} settled twice: {self.settled[tag]}, {how}")
        for t in self.settled if multiple else [tag]:
            if t <= tag and self.settled[t] is None:
                self.settled[t] = how
                self.log.append(f"{how} {t}")


@dataclass(eq=False)
class Message:
    """What the worker reads of a delivery, and its settlement on ``channel``."""

    channel: Channel
    tag: int
    body: bytes
    message_id: str | None
    headers: dict[str, Any] = field(default_factory=dict)
    redelivered: bool = False
    reply_to: str | None = "replies"
    timestamp: None = None
    app_id: str = "test"
    exchange: str = "flashclaim.commands"
    routing_key: str = COUPON
    content_type: str = "application/json"
    type: str = "coupon.claim.requested"
    correlation_id: None = None

    async def ack(self, multiple: bool = False) -> None:
        self.channel.settle(self.tag, "ack", multiple)

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        self.channel.settle(self.tag, "requeue" if requeue else "drop")

    async def reject(self, requeue: bool = False) -> None:
        self.channel.settle(self.tag, "requeue" if requeue else "reject")


class Inbox(ClaimStore):
    """The inbox and the coupons, in memory. A claim of a user in ``explode`` makes its
    whole transaction fail; ``unwritable`` makes counting a failure fail."""

    def __init__(self, channel: Channel, stock: int = 100) -> None:
        super().__init__(cast(Any, None), "worker", MAX_ATTEMPTS)
        self.channel = channel
        self.stock = {COUPON: stock}
        self.holders: set[tuple[str, str]] = set()
        self.processed: dict[uuid.UUID, ClaimResult] = {}
        # Failed attempts; at max_attempts the row is FAILED, and a failure after that (a
        # replay failing again) starts the count over, as inbox_record_failure does.
        self.failures: Counter[uuid.UUID] = Counter()
        self.explode: set[str] = set()
        self.unwritable = False
        self.applied: Counter[uuid.UUID] = Counter()

    async def apply(self, deliveries: Sequence[Delivery]) -> BatchOutcome:
        await asyncio.sleep(0)
        commands = [d.command for d in deliveries]
        if any(c.user_id in self.explode for c in commands):
            raise RuntimeError("refusing claims of this user")
        results = {
            c.request_id: self.processed[c.request_id]
            for c in commands
            if c.request_id in self.processed
        }
        todo = [c for c in commands if c.request_id not in self.processed]
        outcomes = decide(self.stock, self.holders, todo)
        for c, o in zip(todo, outcomes, strict=True):
            if o is Outcome.CLAIMED:
                self.stock[c.coupon_name] -= 1
                self.holders.add((c.coupon_name, c.user_id))
            self.processed[c.request_id] = results[c.request_id] = ClaimResult.of(c, o)
            self.applied[c.request_id] += 1
            self.channel.log.append(f"commit {c.user_id}")
        granted = sum(o is Outcome.CLAIMED for o in outcomes)
        return BatchOutcome(
            results,
            len(todo),
            len(commands) - len(todo),
            granted,
            Counter(o.code for o in outcomes),
        )

    async def record_failure(self, delivery: Delivery, error: BaseException) -> Attempts | None:
        if self.unwritable:
            raise ConnectionError("the database went away")
        request_id = delivery.command.request_id
        if request_id in self.processed:
            return None
        if self.failures[request_id] >= self.max_attempts:
            self.failures[request_id] = 0
        self.failures[request_id] += 1
        count = self.failures[request_id]
        return Attempts(count, count >= self.max_attempts)


class DeadLetters(DeadLetterPublisher):
    """A DLQ that takes what is sent (or refuses it while ``refusing``)."""

    def __init__(self, channel: Channel) -> None:
        super().__init__(cast(Any, None), "consumer test")
        self.channel = channel
        self.refusing = False
        self.claims: list[tuple[str | None, str, int | None]] = []
        self.messages: list[tuple[str | None, str]] = []

    async def send(
        self, message: AbstractIncomingMessage, reason: str, error: BaseException
    ) -> None:
        if self.refusing:
            await message.reject(requeue=False)
            return
        self.messages.append((message.message_id, reason))
        await message.ack()

    async def send_claim(
        self,
        message: AbstractIncomingMessage,
        request_id: str | None,
        body: bytes,
        reason: str,
        error: BaseException,
        attempts: int | None = None,
    ) -> bool:
        if self.refusing:
            return False
        self.claims.append((request_id, reason, attempts))
        self.channel.log.append(f"dead-letter {request_id}")
        return True


class Results:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.published: list[ClaimResult] = []

    async def publish(self, results: Iterable[tuple[ClaimResult, str | None]]) -> None:
        for result, _ in results:
            self.published.append(result)
            self.channel.log.append(f"report {result.user_id}")


class Receiver(BatchReceiver):
    def __init__(self) -> None:
        super().__init__(cast(list[AbstractQueue], []), batch_size=100, linger=0)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


@dataclass
class Consumer:
    """A worker over the fakes, and a broker that delivers to it in order."""

    channel: Channel = field(default_factory=Channel)
    tags: int = 0

    def __post_init__(self) -> None:
        self.inbox = Inbox(self.channel)
        self.dead_letters = DeadLetters(self.channel)
        self.results = Results(self.channel)
        self.worker = ClaimWorker(
            Receiver(), self.inbox, Reporter(self.results), self.dead_letters, batch_claims=4
        )

    def message(self, *commands: ClaimCommand, body: bytes | None = None, **kw: Any) -> Message:
        message_id, encoded = encode_claims(commands)
        self.tags += 1
        self.channel.settled[self.tags] = None
        return Message(
            self.channel, self.tags, body if body is not None else encoded, message_id, **kw
        )

    def again(self, message: Message) -> Message:
        """``message`` delivered once more (the broker counts the deliveries)."""
        count = int(message.headers.get("x-delivery-count", 0)) + 1
        self.tags += 1
        self.channel.settled[self.tags] = None
        return Message(
            self.channel,
            self.tags,
            message.body,
            message.message_id,
            {**message.headers, "x-delivery-count": count},
            redelivered=True,
        )

    async def deliver(self, *messages: Message) -> None:
        """One batch handled, and what it committed reported and acknowledged."""
        self.worker.reporter.start()
        await self.worker.handle([cast(AbstractIncomingMessage, m) for m in messages])
        await self.worker.reporter.close(grace=5)

    def settled(self, message: Message) -> str | None:
        return self.channel.settled[message.tag]


def claim(user: str) -> ClaimCommand:
    return ClaimCommand(uuid.uuid4(), user, COUPON, "replies")


async def test_messages_are_acknowledged_only_after_their_claims_are_committed_and_reported() -> (
    None
):
    c = Consumer()
    messages = [c.message(claim(f"u{i}")) for i in range(6)]
    await c.deliver(*messages)
    assert [c.settled(m) for m in messages] == ["ack"] * 6
    assert {r.user_id for r in c.results.published} == {f"u{i}" for i in range(6)}
    log = c.channel.log
    for i, m in enumerate(messages):
        assert log.index(f"commit u{i}") < log.index(f"report u{i}") < log.index(f"ack {m.tag}")
    # Two transactions of at most four claims; each acknowledged with one cumulative ack.
    assert c.channel.acks == [4, 6]


async def test_a_redelivered_claim_is_answered_from_the_inbox_not_applied_again() -> None:
    c = Consumer()
    first = c.message(claim("u1"))
    await c.deliver(first)
    again = c.again(first)
    await c.deliver(again)
    assert (c.settled(first), c.settled(again)) == ("ack", "ack")
    assert c.inbox.applied == Counter({uuid.UUID(first.message_id or ""): 1})
    assert c.results.published[0] == c.results.published[1]
    assert c.results.published[0].outcome is Outcome.CLAIMED


async def test_an_undecodable_message_is_dead_lettered_as_it_is_and_does_not_hold_up_others() -> (
    None
):
    c = Consumer()
    good = [c.message(claim("u1")), c.message(claim("u2"))]
    poison = c.message(claim("x"), body=b"{not json")
    await c.deliver(good[0], poison, good[1])
    assert [c.settled(m) for m in (good[0], poison, good[1])] == ["ack", "ack", "ack"]
    assert c.dead_letters.messages == [(poison.message_id, "poison")]
    assert {r.user_id for r in c.results.published} == {"u1", "u2"}


async def test_an_undecodable_message_the_dlq_refuses_is_rejected() -> None:
    c = Consumer()
    c.dead_letters.refusing = True
    poison = c.message(claim("x"), body=b"[]")
    await c.deliver(poison)
    assert c.settled(poison) == "reject"


async def test_a_poison_claim_goes_alone_and_its_message_is_requeued_if_the_dlq_refuses() -> None:
    c = Consumer()
    good = claim("u1")
    body = (
        b'{"v": 2, "claims": [{"request_id": "%s", "user_id": "u1", "coupon_name": "SALE"},'
        b' {"request_id": "bad", "user_id": "", "coupon_name": "SALE"}]}'
    ) % str(good.request_id).encode()
    c.dead_letters.refusing = True
    refused = c.message(good, claim("u2"), body=body)
    await c.deliver(refused)
    assert c.settled(refused) == "requeue"
    assert not c.inbox.applied  # nothing of it applied: it all comes back
    c.dead_letters.refusing = False
    taken = c.again(refused)
    await c.deliver(taken)
    assert c.settled(taken) == "ack"
    assert c.dead_letters.claims == [("bad", "poison", None)]
    assert [r.user_id for r in c.results.published] == ["u1"]


@pytest.mark.parametrize("size", [1, 3])
async def test_a_failing_claim_is_retried_until_its_last_attempt_then_dead_lettered_alone(
    size: int,
) -> None:
    """One behaviour whether the claim is alone in its message or one of several."""
    c = Consumer()
    c.inbox.explode.add("bad")
    bad = claim("bad")
    others = [claim(f"u{i}") for i in range(size - 1)]
    message = c.message(bad, *others)
    settled = []
    for _ in range(MAX_ATTEMPTS):
        await c.deliver(message)
        settled.append(c.settled(message))
        message = c.again(message)
    assert settled == ["requeue"] * (MAX_ATTEMPTS - 1) + ["ack"]
    assert c.dead_letters.claims == [(str(bad.request_id), "failed", MAX_ATTEMPTS)]
    assert c.inbox.failures == Counter({bad.request_id: MAX_ATTEMPTS})
    # The others applied once, at the first delivery, and answered at the last one.
    assert all(c.inbox.applied[o.request_id] == 1 for o in others)
    assert sorted(r.user_id for r in c.results.published) == sorted(o.user_id for o in others)


@pytest.mark.parametrize("size", [1, 3])
async def test_a_claim_whose_dead_letter_is_not_taken_sends_its_message_back(size: int) -> None:
    """The last attempt failed but the DLQ did not take the claim: its message is
    requeued (never rejected: a rejected message of several claims would carry the
    applied ones to the DLQ too), and dead-lettered once the DLQ takes it."""
    c = Consumer()
    c.inbox.explode.add("bad")
    c.inbox.failures[(bad := claim("bad")).request_id] = MAX_ATTEMPTS - 1
    message = c.message(bad, *[claim(f"u{i}") for i in range(size - 1)])
    c.dead_letters.refusing = True
    await c.deliver(message)
    assert c.settled(message) == "requeue"
    assert c.dead_letters.claims == []
    c.dead_letters.refusing = False
    # Its row is FAILED: the next failures count from one again, up to the last.
    settled = []
    for _ in range(MAX_ATTEMPTS):
        message = c.again(message)
        await c.deliver(message)
        settled.append(c.settled(message))
    assert settled == ["requeue"] * (MAX_ATTEMPTS - 1) + ["ack"]
    assert [d[0] for d in c.dead_letters.claims] == [str(bad.request_id)]


async def test_a_failed_batch_is_split_so_that_the_good_messages_apply() -> None:
    c = Consumer()
    c.inbox.explode.add("bad")
    good = [c.message(claim(f"u{i}")) for i in range(3)]
    bad = c.message(claim("bad"))
    await c.deliver(good[0], bad, good[1], good[2])
    assert [c.settled(m) for m in good] == ["ack"] * 3
    assert c.settled(bad) == "requeue"
    assert {r.user_id for r in c.results.published} == {"u0", "u1", "u2"}


async def test_without_the_inbox_the_brokers_delivery_count_decides_the_last_attempt() -> None:
    c = Consumer()
    c.inbox.explode.add("bad")
    c.inbox.unwritable = True
    first = c.message(claim("bad"))
    await c.deliver(first)
    assert c.settled(first) == "requeue"  # its first failure, as the broker counts
    last = c.message(claim("bad"), headers={"x-delivery-count": MAX_ATTEMPTS - 1})
    await c.deliver(last)
    assert c.settled(last) == "ack"
    assert c.dead_letters.claims[0][1:] == ("failed", MAX_ATTEMPTS)


async def test_a_claim_applied_meanwhile_by_another_delivery_is_answered_when_it_comes_back() -> (
    None
):
    """A failure is recorded against a claim the inbox has PROCESSED by then: the
    message goes back, and its redelivery is answered from the inbox."""
    c = Consumer()
    command = claim("u1")
    await c.deliver(c.message(command))
    c.inbox.explode.add("u1")  # this delivery fails, though the claim was applied
    message = c.message(command)
    await c.deliver(message)
    assert c.settled(message) == "requeue"
    assert c.dead_letters.claims == []
    c.inbox.explode.clear()
    again = c.again(message)
    await c.deliver(again)
    assert c.settled(again) == "ack"
    assert c.inbox.applied[command.request_id] == 1


async def test_a_closed_channel_leaves_the_message_to_redelivery() -> None:
    c = Consumer()
    message = c.message(claim("u1"))
    c.channel.closed = True
    await c.deliver(message)  # does not raise
    assert c.settled(message) is None
    assert c.inbox.applied[uuid.UUID(message.message_id or "")] == 1
