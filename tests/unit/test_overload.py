"""When the gateway refuses a claim for overload (gateway/overload.py), on a clock of its own."""

from __future__ import annotations

from gateway.overload import Overload


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_standing_queue_refuses_and_a_drained_one_lets_in_again() -> None:
    clock = Clock()
    guard = Overload(target_seconds=1.0, interval_seconds=0.5, clock=clock)
    # An interval of slow round trips, the quickest 1.2 s: a queue of over a second.
    for rtt in (1.5, 1.2, 1.8):
        guard.round_trip(rtt)
        assert not guard.refuses()  # the interval is not over yet
    clock.now = 0.5
    assert guard.refuses()
    clock.now = 0.7
    guard.round_trip(1.1)  # still slow: still refused
    assert guard.refuses()
    guard.round_trip(0.4)  # one quick round trip in the interval: the queue is short now
    assert not guard.refuses()
    clock.now = 1.0  # and the interval it ended in lets claims in too
    assert not guard.refuses()


def test_a_burst_that_queued_some_claims_refuses_none() -> None:
    clock = Clock()
    guard = Overload(target_seconds=1.0, interval_seconds=0.5, clock=clock)
    for rtt in (0.02, 2.5, 3.0, 0.05):  # most waited, but some came back at once
        guard.round_trip(rtt)
    clock.now = 0.6
    assert not guard.refuses()


def test_no_round_trip_says_nothing_so_claims_are_let_in() -> None:
    """Every consumer away: claims time out (202) and none comes back; the gateway stays
    queue-first, bounded by the command queues' length."""
    clock = Clock()
    guard = Overload(target_seconds=1.0, interval_seconds=0.5, clock=clock)
    guard.round_trip(2.0)
    clock.now = 0.5
    assert guard.refuses()
    clock.now = 1.0  # an interval with no round trip
    assert not guard.refuses()
    guard.round_trip(2.0)
    clock.now = 3.0  # long after: the last measure is stale
    assert not guard.refuses()
