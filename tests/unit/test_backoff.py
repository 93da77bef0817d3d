"""The claim client's retries back off: exponentially, with jitter, never sooner than
the server's Retry-After; and a 202 is followed at growing intervals."""

from __future__ import annotations

import itertools
import random

from flashclaim.devtools.client import (
    FIRST_RETRY,
    MAX_BACKOFF,
    MAX_POLL,
    poll_delay,
    retry_delay,
)


def test_retries_spread_over_a_window_that_doubles_up_to_the_cap() -> None:
    random.seed(7)
    for retries in range(1, 12):
        ceiling = min(FIRST_RETRY * 2 ** (retries - 1), MAX_BACKOFF)
        delays = [retry_delay(retries) for _ in range(2_000)]
        assert min(delays) >= 0.0 and max(delays) <= ceiling
        # Spread over the window, not bunched at one instant (the crowd comes back
        # over the whole window, not all at once).
        assert max(delays) - min(delays) > 0.8 * ceiling


def test_retry_after_is_a_floor_and_is_capped() -> None:
    random.seed(7)
    assert all(retry_delay(1, "3") >= 3.0 for _ in range(100))
    assert all(retry_delay(20, "3600") <= MAX_BACKOFF for _ in range(100))
    # A value that is not a number of seconds (an HTTP date) leaves the backoff alone.
    assert all(retry_delay(1, "Wed, 21 Oct 2026 07:28:00 GMT") <= FIRST_RETRY for _ in range(100))


def test_a_pending_claim_is_followed_less_and_less_often() -> None:
    delays = [poll_delay(0.2, n) for n in range(12)]
    assert delays[0] == 0.2
    assert all(b >= a for a, b in itertools.pairwise(delays))
    assert delays[-1] == MAX_POLL
    # A caller that asked for slower polling than the cap keeps it.
    assert poll_delay(5.0, 3) == 5.0
