"""Refusing claims early when the consumers are behind: the crowd beyond capacity gets
``503 overloaded`` at once, instead of a place in a queue that answers it late.

The signal is how long the claims published by this process took to come back (from
the confirm of their publish to their result): the time they spent queued in RabbitMQ
and being decided. A crowd the consumers keep up with sees round trips of a few tens
of milliseconds; one they do not keep up with builds a queue, and every round trip
then carries it. So, as CoDel does for packets, this looks at the *shortest* round
trip of an interval: a short burst that queued some claims still lets others through
quickly, while a standing queue makes even the quickest slow.

- While the shortest round trip of the last full interval exceeded ``target`` and no
  round trip of the interval under way has come in under it, a new claim is refused.
  The queue then drains at the consumers' pace, round trips shorten, and claims are
  let in again: what is let in over time is what the consumers decide, and a claim
  let in waits about ``target`` at most (the round trips measured lag by one round
  trip, so a little more at the edges).
- An interval without any round trip (nothing published, or no consumer answering at
  all) says nothing: claims are let in. With every consumer away, the gateway stays
  queue-first (claims answered 202, decided when a consumer is back), bounded by the
  command queues' length limit (flashclaim/core/policies.py), past which the broker
  refuses a publish and the claim is answered 503.
- A claim that timed out (answered 202) is not a round trip: it says the consumers
  are away or far behind, and the round trips of the others say which.

Nothing here decides an answer: a refused claim was never published, and its client
retries after ``Retry-After`` (with its Idempotency-Key, the same claim).
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Long enough to hold several round trips at any load worth refusing, short enough to
# let claims in again soon after the queue has drained.
INTERVAL_SECONDS = 0.5


class Overload:
    def __init__(
        self,
        target_seconds: float,
        interval_seconds: float = INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._target = target_seconds
        self._interval = interval_seconds
        self._clock = clock
        self._started = clock()
        # The shortest round trip of the interval under way, and of the last full one
        # (None: none came back in it).
        self._current: float | None = None
        self._last: float | None = None

    def refuses(self) -> bool:
        """Whether a new claim should be refused now."""
        self._roll()
        if self._current is not None and self._current <= self._target:
            return False
        return self._last is not None and self._last > self._target

    def round_trip(self, seconds: float) -> None:
        """A claim published by this process came back after ``seconds``."""
        self._roll()
        if self._current is None or seconds < self._current:
            self._current = seconds

    def _roll(self) -> None:
        now = self._clock()
        elapsed = now - self._started
        if elapsed < self._interval:
            return
        # An interval with no round trip at all, or more than one interval gone by
        # without any: nothing is known of the queue now.
        self._last = self._current if elapsed < 2 * self._interval else None
        self._current = None
        self._started = now
