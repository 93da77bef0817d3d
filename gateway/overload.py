"""Refusing claims early when the pipeline is behind: the crowd beyond capacity gets
``503 overloaded`` at once, instead of a place in a queue that answers it late.

A claim on its way (published, its result awaited) holds a place; this process lets at
most ``rate * target`` claims hold one at a time, where ``rate`` is how many claims came
back with their result over the last second (Little's law: that many in flight at that
rate wait ``target`` each, whatever the bottleneck, the consumers, the database or this
process's own event loop, all of which the round trip includes). Beyond it, a claim
about to be published is refused instead.

- Under a load the pipeline keeps up with, the claims in flight are the rate times
  their short round trip, well under the limit: nothing is refused.
- Under a crowd beyond capacity the results come back at the capacity, so the limit is
  the capacity times ``target``: the claims let in wait about ``target``, the others are
  refused before anything is published, and this process's own work stays bounded (a
  refusal costs a small part of what a claim does).
- Nothing came back in the last second (the process was idle, or every consumer is
  away): nothing is known, and no limit applies. A burst after a quiet time is let in
  (claims held back by gateway/admission.py hold no place: they are not on their way),
  and with every consumer away the gateway stays queue-first (claims answered 202,
  decided when a consumer is back), bounded by ``MAX_IN_FLIGHT_CLAIMS`` and the command
  queues' length limit (flashclaim/core/policies.py), past which the broker refuses a
  publish and the claim is answered 503.
- ``floor``: the limit is never lower, so that a slow trickle of results does not
  starve the process (at 10 results a second, 5 in flight would be the limit).

Nothing here decides an answer: a refused claim was never published, and its client
retries after ``Retry-After`` (with its Idempotency-Key, the same claim).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

# Results counted over the last WINDOW_SECONDS, in BUCKETS parts.
WINDOW_SECONDS = 1.0
BUCKETS = 10
FLOOR = 50


class Overload:
    def __init__(
        self,
        target_seconds: float,
        floor: int = FLOOR,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._target = target_seconds
        self._floor = floor
        self._clock = clock
        self._width = WINDOW_SECONDS / BUCKETS
        # (bucket number, results that came back in it), oldest first.
        self._results: collections.deque[list[int]] = collections.deque()
        self.in_flight = 0

    def limit(self) -> int | None:
        """Claims this process may have on their way now; ``None``: no limit (nothing
        came back in the last second)."""
        self._forget_old()
        came_back = sum(count for _, count in self._results)
        if not came_back:
            return None
        return max(self._floor, int(came_back / WINDOW_SECONDS * self._target))

    def admit(self) -> bool:
        """Take a place for a claim about to be published, or ``False`` (refuse it)."""
        limit = self.limit()
        if limit is not None and self.in_flight >= limit:
            return False
        self.in_flight += 1
        return True

    def finished(self, answered: bool) -> None:
        """A claim admitted is no longer on its way: ``answered`` if its result came
        back (a claim answered 202 after its wait is not a result that came back)."""
        self.in_flight = max(0, self.in_flight - 1)
        if answered:
            bucket = int(self._clock() / self._width)
            if self._results and self._results[-1][0] == bucket:
                self._results[-1][1] += 1
            else:
                self._results.append([bucket, 1])

    def _forget_old(self) -> None:
        oldest = int(self._clock() / self._width) - BUCKETS + 1
        while self._results and self._results[0][0] < oldest:
            self._results.popleft()
