"""Refusing claims early when the pipeline is behind: the crowd beyond capacity gets
``503 overloaded`` at once, instead of a place in a queue that answers it late.

A claim on its way (published, its result awaited) holds a place. This process lets at
most ``rate * target`` claims hold a place at a time, ``rate`` being how many results
came back over the last second (Little's law: that many in flight at that rate wait
``target`` each, the time from their publish to their result, in which the consumers,
the database and this process's own event loop all are), and never fewer than
``floor``. Beyond it, a claim is refused: at the door, before its body is read
(:meth:`Overload.full`), and again just before it would be published (:meth:`admit`).

- Under a crowd beyond capacity the results come back at the capacity, so the limit is
  the capacity times ``target``: the claims let in wait about ``target``, the others are
  refused before anything is read or published, and this process's own work stays
  bounded (a refusal at the door costs a small part of what a claim does). The limit
  follows the rate the results come back at, whatever slows them: a slow database, or
  this process's own CPU, spent on the crowd.
- ``floor``: however few results came back, ``floor`` claims may be on their way. A
  flash sale sends few claims on their way (the gateway answers the others itself, and
  claims held back by gateway/admission.py hold no place), and their rate says nothing
  of the capacity; a steady load of a few hundred a second with round trips of a
  second, on a slow machine, holds a hundred or so. Neither is refused.
- Nothing came back in the last second (the process was idle, or every consumer is
  away): nothing is known, and no limit applies. With every consumer away the gateway
  stays queue-first (claims answered 202 after their wait, decided when a consumer is
  back), bounded by ``MAX_IN_FLIGHT_CLAIMS`` and the command queues' length limit
  (flashclaim/core/policies.py), past which the broker refuses a publish and the claim
  is answered 503.

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
FLOOR = 200  # claims on their way, whatever came back (see above)


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
        # (bucket number, results that came back in it), oldest first, and their sum.
        self._buckets: collections.deque[tuple[int, int]] = collections.deque()
        self._came_back = 0
        self.in_flight = 0

    def limit(self) -> int | None:
        """Claims this process may have on their way now; ``None``: no limit (nothing
        came back in the last second)."""
        self._forget_old()
        if not self._came_back:
            return None
        return max(self._floor, int(self._came_back / WINDOW_SECONDS * self._target))

    def full(self) -> bool:
        """No place for one more claim now (one arriving is refused)."""
        limit = self.limit()
        return limit is not None and self.in_flight >= limit

    def admit(self) -> bool:
        """Take a place for a claim about to be published, or ``False`` (refuse it)."""
        if self.full():
            return False
        self.in_flight += 1
        return True

    def finished(self, came_back: bool) -> None:
        """A claim admitted is no longer on its way: its result ``came_back``, or not
        (answered 202 after its wait, or not published)."""
        self.in_flight = max(0, self.in_flight - 1)
        if came_back:
            bucket = int(self._clock() / self._width)
            if self._buckets and self._buckets[-1][0] == bucket:
                self._buckets[-1] = (bucket, self._buckets[-1][1] + 1)
            else:
                self._buckets.append((bucket, 1))
            self._came_back += 1

    def _forget_old(self) -> None:
        oldest = int(self._clock() / self._width) - BUCKETS + 1
        while self._buckets and self._buckets[0][0] < oldest:
            self._came_back -= self._buckets.popleft()[1]
