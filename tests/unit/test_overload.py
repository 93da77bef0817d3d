"""How many claims a gateway process lets on their way (gateway/overload.py), on a
clock of its own."""

from __future__ import annotations

from gateway.overload import FLOOR, Overload


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def came_back(guard: Overload, clock: Clock, results: int, over: float = 0.95) -> None:
    """``results`` claims let in, then back with their result, spread over ``over``."""
    for _ in range(results):
        clock.now += over / results
        assert guard.admit()
        guard.finished(True)


def test_the_claims_on_their_way_are_bounded_by_the_rate_they_come_back_at() -> None:
    clock = Clock()
    guard = Overload(target_seconds=0.5, floor=10, clock=clock)
    came_back(guard, clock, 400)  # 400 results in the last second
    assert guard.limit() == 200  # 400/s for half a second each
    let_in = sum(guard.admit() for _ in range(1000))
    assert let_in == 200 and guard.in_flight == 200
    guard.finished(True)  # one back: one place
    assert not guard.full()
    assert guard.admit() and not guard.admit()
    assert guard.full()  # the door refuses as the publish would


def test_nothing_back_in_the_last_second_sets_no_limit() -> None:
    """Idle, then a burst: let in. Every consumer away (no result comes back, claims
    answered 202): queue-first, bounded elsewhere."""
    clock = Clock()
    guard = Overload(target_seconds=0.5, floor=10, clock=clock)
    assert guard.limit() is None
    assert all(guard.admit() for _ in range(5000))
    for _ in range(5000):
        guard.finished(False)
    came_back(guard, clock, 100)
    assert guard.limit() == 50
    clock.now += 1.5  # a second and a half without a result
    assert guard.limit() is None
    assert guard.admit()
    guard.finished(False)  # answered 202: not a result that came back
    assert guard.limit() is None


def test_a_trickle_of_results_keeps_the_floor() -> None:
    clock = Clock()
    guard = Overload(target_seconds=0.5, floor=10, clock=clock)
    came_back(guard, clock, 4)
    assert guard.limit() == 10


def test_the_floor_lets_a_flash_sales_few_claims_through() -> None:
    """A flash sale: the gateway answers most claims itself and sends few on their way;
    their rate says nothing of the capacity, and the floor lets them all through."""
    clock = Clock()
    guard = Overload(target_seconds=0.5, clock=clock)
    came_back(guard, clock, 20)  # 20 results a second: 10 by Little's law
    assert guard.limit() == FLOOR
    assert all(guard.admit() for _ in range(FLOOR))
    assert guard.full() and not guard.admit()
