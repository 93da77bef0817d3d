"""The pieces that decide answers without the database, by property: ``decide()``
against a reference model, the final answers and the admission against a model
database they learn from, and the coalescer.

Each machine keeps the truth (a dictionary standing for PostgreSQL) and drives the
piece as the gateway or the consumer would, in any order Hypothesis finds; the
invariants are checked after every step.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from consumer.decide import decide
from flashclaim.core.messages import ClaimCommand, ClaimResult, Outcome
from gateway.admission import Admission
from gateway.coalescer import Coalescer
from gateway.gateway_answers import GatewayAnswers

COUPONS = ["A", "B", "C"]
USERS = [f"u{i}" for i in range(6)]
coupons = st.sampled_from(COUPONS)
users = st.sampled_from(USERS)
requests = st.lists(st.tuples(st.sampled_from([*COUPONS, "NONE"]), users), max_size=12)


def command(coupon: str, user: str) -> ClaimCommand:
    return ClaimCommand(uuid.uuid4(), user, coupon)


@dataclass
class Database:
    """The truth: each coupon's stock and its holders, changed one claim at a time."""

    stock: dict[str, int]
    amount: dict[str, int] = field(default_factory=dict)
    holders: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.amount = dict(self.stock)
        self.holders = {c: [] for c in self.stock}

    def answer(self, coupon: str, user: str) -> Outcome:
        """The rules, written plainly: unknown coupon, holder, no stock, granted."""
        if coupon not in self.stock:
            return Outcome.NO_SUCH_COUPON
        if user in self.holders[coupon]:
            return Outcome.ALREADY_CLAIMED
        if self.stock[coupon] == 0:
            return Outcome.OUT_OF_STOCK
        self.stock[coupon] -= 1
        self.holders[coupon].append(user)
        return Outcome.CLAIMED

    def pairs(self) -> set[tuple[str, str]]:
        return {(c, u) for c, us in self.holders.items() for u in us}


# ---------------------------------------------------------------------------- decide()


class DecideMachine(RuleBasedStateMachine):
    """Batches applied to the truth by ``decide()``, as the consumer does, against the
    rules applied one request at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.db = Database({"A": 2, "B": 1, "C": 4})
        self.model = Database({"A": 2, "B": 1, "C": 4})

    @rule(batch=requests)
    def apply_a_batch(self, batch: list[tuple[str, str]]) -> None:
        commands = [command(c, u) for c, u in batch]
        outcomes = decide(self.db.stock, self.db.pairs(), commands)
        assert len(outcomes) == len(commands)  # every claim answered, once
        expected = [self.model.answer(c, u) for c, u in batch]
        assert outcomes == expected
        for cmd, outcome in zip(commands, outcomes, strict=True):
            if outcome is Outcome.CLAIMED:
                self.db.stock[cmd.coupon_name] -= 1
                self.db.holders[cmd.coupon_name].append(cmd.user_id)

    @rule(batch=requests, cut=st.integers(min_value=0, max_value=12))
    def a_batch_split_answers_the_same(self, batch: list[tuple[str, str]], cut: int) -> None:
        """The consumer splits a failing batch: the halves, applied in turn, answer
        what the whole would have."""
        commands = [command(c, u) for c, u in batch]
        whole = decide(self.db.stock, self.db.pairs(), commands)
        first = decide(self.db.stock, self.db.pairs(), commands[:cut])
        stock, held = dict(self.db.stock), self.db.pairs()
        for cmd, outcome in zip(commands[:cut], first, strict=True):
            if outcome is Outcome.CLAIMED:
                stock[cmd.coupon_name] -= 1
                held.add((cmd.coupon_name, cmd.user_id))
        assert first + decide(stock, held, commands[cut:]) == whole

    @invariant()
    def never_more_granted_than_stock(self) -> None:
        for coupon, amount in self.db.amount.items():
            assert 0 <= self.db.stock[coupon] == amount - len(self.db.holders[coupon])
            assert len(set(self.db.holders[coupon])) == len(self.db.holders[coupon])


TestDecide = DecideMachine.TestCase


def test_already_claimed_comes_before_out_of_stock() -> None:
    outcomes = decide({"A": 1}, set(), [command("A", "x"), command("A", "x"), command("A", "y")])
    assert outcomes == [Outcome.CLAIMED, Outcome.ALREADY_CLAIMED, Outcome.OUT_OF_STOCK]


# ------------------------------------------------------------------------ GatewayAnswers


class GatewayAnswersMachine(RuleBasedStateMachine):
    """Results reach the gateway late and out of order (they come back from several
    batches and partitions); its final answers are asked at any moment. Whatever they
    answer must be what the database would answer, now and for good."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.db = Database({"A": 2, "B": 1, "C": 3})
        self.in_transit: list[ClaimResult] = []
        self.closed: list[str] = []

        async def holders(coupon: str) -> list[str]:
            return list(self.db.holders[coupon])

        # A small bound, so that forgetting coupons is exercised too.
        self.known = GatewayAnswers(holders, max_entries=4, on_sold_out=self.closed.append)

    def teardown(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    def inside(self, call: Callable[[], object]) -> None:
        """``call`` run in the event loop, as the gateway runs it."""

        async def run() -> None:
            call()

        self.loop.run_until_complete(run())

    @rule(coupon=coupons, user=users)
    def a_claim_is_committed(self, coupon: str, user: str) -> None:
        outcome = self.db.answer(coupon, user)
        cmd = command(coupon, user)
        self.in_transit.append(ClaimResult.of(cmd, outcome, self.db.stock[coupon]))

    @precondition(lambda self: self.in_transit)
    @rule(data=st.data())
    def a_result_arrives(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.in_transit) - 1))
        result = self.in_transit.pop(index)
        self.inside(lambda: self.known.learn(result))

    @rule(coupon=coupons)
    def the_stock_is_read(self, coupon: str) -> None:
        """The admission read the stock: at 0, it tells the final answers."""
        if self.db.stock[coupon] == 0:
            self.inside(lambda: self.known.sold_out(coupon))

    @rule()
    def time_passes(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0))

    @rule(coupon=coupons, user=users)
    def a_claim_is_asked(self, coupon: str, user: str) -> None:
        answer = self.known.answer(command(coupon, user))
        if answer is Outcome.ALREADY_CLAIMED:
            assert user in self.db.holders[coupon]
        elif answer is Outcome.OUT_OF_STOCK:
            assert self.db.stock[coupon] == 0 and user not in self.db.holders[coupon]
        else:
            assert answer is None

    @invariant()
    def only_sold_out_coupons_are_closed(self) -> None:
        assert all(self.db.stock[c] == 0 for c in self.closed)
        assert self.known._size <= 4  # internal: user ids held


TestGatewayAnswers = GatewayAnswersMachine.TestCase
TestGatewayAnswers.settings = settings(max_examples=200, stateful_step_count=40)


# --------------------------------------------------------------------------- Admission


class AdmissionMachine(RuleBasedStateMachine):
    """Claims enter, are published, come back with the database's answer; the final
    answers close a coupon once it is sold out. No more claims of a coupon are in flight
    than it had stock, and no held claim is ever left behind."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.db = Database({"A": 2, "B": 1, "C": 3})
        self.first_read: dict[str, int] = {}

        async def remaining(coupon: str) -> int:
            self.first_read.setdefault(coupon, self.db.stock[coupon])
            return self.db.stock[coupon]

        # A hold far longer than any test: a claim is released or answered, never
        # published for want of news.
        self.admission = Admission(remaining, hold_seconds=3600)
        self.waiting: list[tuple[str, str, asyncio.Task[bool]]] = []
        self.flying: list[tuple[str, str]] = []
        self.answered = 0

    def settle(self) -> None:
        for _ in range(5):
            self.loop.run_until_complete(asyncio.sleep(0))
        still = []
        for coupon, user, task in self.waiting:
            if not task.done():
                still.append((coupon, user, task))
            elif task.result():
                self.flying.append((coupon, user))
            else:
                self.answered += 1  # answered from the final answers
        self.waiting = still

    def teardown(self) -> None:
        # Everything in flight comes back: every held claim is then released or
        # answered, none left waiting.
        while self.flying or self.waiting:
            assert self.flying, f"held for good: {[(c, u) for c, u, _ in self.waiting]}"
            self.comes_back(0)
        self.loop.close()

    @rule(coupon=coupons, user=users)
    def a_claim_arrives(self, coupon: str, user: str) -> None:
        task = self.loop.create_task(self.admission.enter(coupon))
        self.waiting.append((coupon, user, task))
        self.settle()

    @precondition(lambda self: self.flying)
    @rule(data=st.data())
    def a_claim_returns(self, data: st.DataObject) -> None:
        self.comes_back(data.draw(st.integers(0, len(self.flying) - 1)))

    def comes_back(self, index: int) -> None:
        coupon, user = self.flying.pop(index)
        outcome = self.db.answer(coupon, user)
        result = ClaimResult.of(command(coupon, user), outcome, self.db.stock[coupon])
        self.admission.leave(coupon, result)
        if outcome is Outcome.OUT_OF_STOCK or self.db.stock[coupon] == 0:
            self.admission.sold_out(coupon)  # what the final answers then say
        self.settle()

    @invariant()
    def no_more_in_flight_than_stock(self) -> None:
        for coupon in COUPONS:
            if coupon in self.first_read:
                in_flight = sum(1 for c, _ in self.flying if c == coupon)
                assert in_flight <= self.first_read[coupon]
                state = self.admission._coupons.get(coupon)  # internal accounting
                assert (state.in_flight if state else 0) == in_flight


TestAdmission = AdmissionMachine.TestCase
TestAdmission.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


# --------------------------------------------------------------------------- Coalescer


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    claims=st.lists(coupons, min_size=1, max_size=30),
    max_claims=st.integers(1, 5),
    failing=st.sets(st.integers(0, 40)),
)
def test_the_coalescer_sends_each_claim_once_with_its_coupon_and_its_message_fate(
    claims: list[str], max_claims: int, failing: set[int]
) -> None:
    """Each claim goes out in exactly one message, of its own coupon, at most
    ``max_claims`` a message; a claim's publish fails exactly when its message did."""
    sent: list[list[ClaimCommand]] = []

    async def publish(batch: Sequence[ClaimCommand]) -> None:
        index = len(sent)
        sent.append(list(batch))
        await asyncio.sleep(0)  # others are sent meanwhile
        if index in failing:
            raise ConnectionError(f"message {index} refused")

    async def run() -> list[BaseException | None]:
        coalescer = Coalescer(publish, linger=0, max_claims=max_claims)
        commands = [command(c, "u") for c in claims]
        outcomes = await asyncio.gather(
            *(coalescer.publish(cmd) for cmd in commands), return_exceptions=True
        )
        assert Counter(cmd.request_id for batch in sent for cmd in batch) == Counter(
            cmd.request_id for cmd in commands
        )
        message_of = {cmd.request_id: i for i, batch in enumerate(sent) for cmd in batch}
        for cmd, outcome in zip(commands, outcomes, strict=True):
            assert (outcome is not None) == (message_of[cmd.request_id] in failing)
        return outcomes

    asyncio.run(run())
    for batch in sent:
        assert 1 <= len(batch) <= max_claims
        assert len({cmd.coupon_name for cmd in batch}) == 1


@pytest.mark.parametrize("linger", [0.0, 0.001])
def test_a_lingering_batch_takes_the_claims_of_one_turn(linger: float) -> None:
    sent: list[int] = []

    async def publish(batch: Sequence[ClaimCommand]) -> None:
        sent.append(len(batch))

    async def run() -> None:
        coalescer = Coalescer(publish, linger=linger, max_claims=100)
        await asyncio.gather(*(coalescer.publish(command("A", f"u{i}")) for i in range(10)))

    asyncio.run(run())
    assert sent == [10]
