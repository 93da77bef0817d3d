"""Submitting a claim: publish the command, then wait for its result (or answer 202).

On its way a claim may be answered at once (a final answer this process knows), held
back while the claims already in flight could take all the stock (gateway/admission.py),
and published together with the other claims of its coupon that arrived with it
(gateway/coalescer.py). The whole wait, held time included, is ``wait_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict

from flashclaim.core import tracing
from flashclaim.core.errors import DependencyUnavailable, IdempotencyKeyReused, Overloaded
from flashclaim.core.messages import ClaimCommand, ClaimResult, Outcome
from flashclaim.core.metrics import GatewayMetrics
from flashclaim.core.results import ResultStore
from gateway.admission import Admission
from gateway.coalescer import Coalescer
from gateway.gateway_answers import GatewayAnswers, GatewayAnswerWriter
from gateway.overload import Overload
from gateway.replies import ReplyListener

log = logging.getLogger(__name__)

ACCEPTED_MEMORY = 200_000


BEHIND = "the claims on their way are more than the pipeline answers; retry shortly"


class Claims:
    def __init__(
        self,
        publisher: Coalescer,
        replies: ReplyListener,
        results: ResultStore,
        wait_seconds: float,
        max_in_flight: int,
        known: GatewayAnswers | None = None,
        admission: Admission | None = None,
        metrics: GatewayMetrics | None = None,
        overload: Overload | None = None,
    ) -> None:
        self._publisher = publisher
        self._overload = overload
        self._admission = admission
        self._replies = replies
        self._results = results
        self._wait = wait_seconds
        # A non-blocking semaphore: over the bound a claim is refused at once (503)
        # rather than queued in memory behind the others.
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        # Request ids this process answered 202 for, so that GET /api/claims/{id} says
        # "pending" (not 404) even while Redis, which normally keeps that mark, is away.
        self._accepted: OrderedDict[uuid.UUID, str] = OrderedDict()  # id -> its user
        self._known = known
        self._answer_writer = GatewayAnswerWriter(results.store_gateway_answers)
        self._metrics = metrics or GatewayMetrics(enabled=False)

    def refuse_if_overloaded(self) -> None:
        """At the door, before a claim's body is read: :class:`Overloaded` while this
        process has as many claims on their way as it may (gateway/overload.py), so that
        the crowd beyond capacity costs as little as an answer can."""
        if self._overload is not None and self._overload.full():
            raise Overloaded(BEHIND)

    async def submit(self, command: ClaimCommand, replayable: bool) -> ClaimResult | None:
        """The claim's final result, or ``None`` if it is still pending after the wait.

        ``replayable`` (an Idempotency-Key was given): a result already recorded for this
        request id is returned as it is, without publishing again.
        """
        if self._in_flight >= self._max_in_flight:
            raise Overloaded("too many claims in flight; retry shortly")
        self._in_flight += 1
        # One frame for a claim held back (in a sell-out, nearly every claim of a burst
        # waits in Admission.enter at once, and each frame is memory).
        try:
            fingerprinted = False
            if replayable:
                # While the broker is away, refused at once (503): asking Redis first
                # for each of a crowd retrying would keep the process busy for nothing
                # when the broker comes back (an answer already given is given then).
                self._publisher.check()
                # The key is taken for this claim before anything is published, so that
                # the same key with another coupon is refused (422) even while the first
                # claim is still on its way.
                prior = await self._recall(command)
                if isinstance(prior, ClaimResult):
                    return self._answered(_same_claim(prior, command), "gateway")
                fingerprinted = prior
            answer = self._gateway_answer(command, replayable, fingerprinted)
            if answer is not None:
                return self._answered(answer, "gateway")
            started = time.monotonic()
            if self._admission is not None and not await self._admission.enter(command.coupon_name):
                # Held until the coupon was known sold out: the gateway's answers have it now.
                answer = self._gateway_answer(command, replayable, fingerprinted)
                if answer is not None:
                    return self._answered(answer, "held")
                self._admission.count(command.coupon_name)
            return await self._round_trip(command, replayable, started)
        finally:
            self._in_flight -= 1

    async def _round_trip(
        self, command: ClaimCommand, replayable: bool, started: float
    ) -> ClaimResult | None:
        """Publish the claim (counted in flight by the admission, if any) and wait for
        its result until ``wait_seconds`` after ``started``; refused (503) instead if
        the pipeline is behind (gateway/overload.py)."""
        result: ClaimResult | None = None
        if self._overload is not None and not self._overload.admit():
            if self._admission is not None:
                self._admission.leave(command.coupon_name, None)
            raise Overloaded(BEHIND)
        came_back = False
        reply = self._replies.expect(command.request_id)
        try:
            # The consumer answers on this process's own channel.
            await self._publisher.publish(
                ClaimCommand(
                    command.request_id,
                    command.user_id,
                    command.coupon_name,
                    self._replies.channel,
                    tracing.current_traceparent(),
                )
            )
            published = time.monotonic()
            try:
                # asyncio.timeout: lighter than a wait_for (no second future, no frame).
                async with asyncio.timeout(max(self._wait - (published - started), 0.0)):
                    result = await reply
                came_back = True
            except TimeoutError:
                # The reply may have been missed (Redis reconnecting): look it up once.
                result = await self.lookup(command.request_id)
            self._metrics.result_waited(time.monotonic() - published)
        finally:
            self._replies.forget(command.request_id, reply)
            if self._admission is not None:
                self._admission.leave(command.coupon_name, result)
            if self._overload is not None:
                self._overload.finished(came_back)
        if result is None:
            await self._mark_pending(command)
            return self._answered(None, "round_trip")
        if self._known is not None:
            self._known.learn(result)
        return self._answered(_same_claim(result, command) if replayable else result, "round_trip")

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _answered(self, result: ClaimResult | None, path: str) -> ClaimResult | None:
        self._metrics.claim_answered(result.outcome.code if result else "pending", path)
        return result

    def _gateway_answer(
        self, command: ClaimCommand, replayable: bool, fingerprinted: bool
    ) -> ClaimResult | None:
        """A final answer known in this process, if it may be given without a round trip."""
        outcome = self._known.answer(command) if self._known is not None else None
        # A retried request may have been granted the first time: only "sold out" (which
        # a holder never gets) is safe to answer for it without asking the inbox, and
        # only once its key is known to stand for this very claim.
        if outcome is None or (
            replayable and not (outcome is Outcome.OUT_OF_STOCK and fingerprinted)
        ):
            return None
        # Final whatever happens next (see gateway/gateway_answers.py): no round trip. It is kept
        # briefly (never over a real result) so GET /api/claims/{id} finds it.
        answer = ClaimResult.of(command, outcome)
        self._answer_writer.add(answer)
        return answer

    async def _recall(self, command: ClaimCommand) -> ClaimResult | bool:
        """The answer a request id sent again already has; else whether the id is now
        recorded as standing for this claim (``False`` if Redis is away: the consumer's
        inbox still applies one claim per id, and the answer then tells the client
        whether it was theirs)."""
        claim = command.coupon_name.encode()
        try:
            recalled = await self._results.recall(command.request_id, claim)
        except DependencyUnavailable as exc:
            log.warning("result lookup and fingerprint failed", extra={"error": repr(exc)})
            return False
        if isinstance(recalled, ClaimResult):
            return recalled
        if recalled != claim:
            raise IdempotencyKeyReused("Idempotency-Key was already used for a different claim")
        return True

    async def drain(self) -> None:
        """Finish the background writes (at shutdown)."""
        await self._answer_writer.drain()

    async def lookup(self, request_id: uuid.UUID) -> ClaimResult | None:
        """The result held in Redis, or ``None`` (also when Redis cannot be reached)."""
        try:
            return await self._results.get(request_id)
        except DependencyUnavailable as exc:
            log.warning("result lookup failed", extra={"error": repr(exc)})
            return None

    async def pending_owner(self, request_id: uuid.UUID) -> str | None:
        """The user of a claim answered 202 and not yet decided, or ``None``. An empty
        string: pending, its user not recorded (a mark from before users were kept)."""
        if (owner := self._accepted.get(request_id)) is not None:
            return owner
        try:
            return await self._results.pending_owner(request_id)
        except DependencyUnavailable as exc:
            log.warning("pending mark not read", extra={"error": repr(exc)})
            return None

    async def _mark_pending(self, command: ClaimCommand) -> None:
        self._accepted[command.request_id] = command.user_id
        while len(self._accepted) > ACCEPTED_MEMORY:
            self._accepted.popitem(last=False)
        try:
            await self._results.mark_pending(command.request_id, command.user_id)
        except DependencyUnavailable as exc:
            log.warning("pending mark failed", extra={"error": repr(exc)})


def _same_claim(result: ClaimResult, command: ClaimCommand) -> ClaimResult:
    if (result.user_id, result.coupon_name) != (command.user_id, command.coupon_name):
        raise IdempotencyKeyReused("Idempotency-Key was already used for a different claim")
    return result
