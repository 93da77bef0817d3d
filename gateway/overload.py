"""Refusing claims early when the pipeline is behind: the crowd beyond capacity gets
``503 overloaded`` at once, instead of a place in a queue that answers it late.

A claim on its way (published, its result awaited) holds a place. While the claims that
came back over the last second took ``target`` or more on average (from their publish
to their result: the consumers, the database and this process's own event loop are all
in it), the pipeline is behind, and this process lets at most ``rate * target`` claims
hold a place at a time, ``rate`` being how many came back over that second (Little's
law: that many in flight at that rate wait ``target`` each). Beyond it, a claim about to
be published is refused instead.

- Under a load the pipeline keeps up with, round trips are short: nothing is refused,
  however few claims came back (a flash sale sends few on their way, the gateway
  answering the others itself, so their rate says nothing of the capacity).
- Under a crowd beyond capacity the round trips lengthen to ``target``, and the results
  come back at the capacity, so the limit is the capacity times ``target``: the claims
  let in wait about ``target``, the others are refused before anything is published,
  and this process's own work stays bounded (a refusal costs a small part of what a
  claim does).
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
        # [bucket number, results that came back in it, their round trips' sum], oldest
        # first.
        self._results: collections.deque[list[float]] = collections.deque()
        self.in_flight = 0

    def limit(self) -> int | None:
        """Claims this process may have on their way now; ``None``: no limit (nothing
        came back in the last second, or quickly)."""
        self._forget_old()
        came_back = sum(count for _, count, _ in self._results)
        if not came_back or sum(s for *_, s in self._results) / came_back < self._target:
            return None
        return max(self._floor, int(came_back / WINDOW_SECONDS * self._target))

    def admit(self) -> bool:
        """Take a place for a claim about to be published, or ``False`` (refuse it)."""
        limit = self.limit()
        if limit is not None and self.in_flight >= limit:
            return False
        self.in_flight += 1
        return True

    def finished(self, round_trip: float | None) -> None:
        """A claim admitted is no longer on its way: its ``round_trip`` if its result
        came back (``None``: answered 202 after its wait, or not published)."""
        self.in_flight = max(0, self.in_flight - 1)
        if round_trip is not None:
            bucket = int(self._clock() / self._width)
            if self._results and self._results[-1][0] == bucket:
                self._results[-1][1] += 1
                self._results[-1][2] += round_trip
            else:
                self._results.append([bucket, 1, round_trip])

    def _forget_old(self) -> None:
        oldest = int(self._clock() / self._width) - BUCKETS + 1
        while self._results and self._results[0][0] < oldest:
            self._results.popleft()
