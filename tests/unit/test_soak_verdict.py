"""How `make soak` reads its generator's lines and judges memory and fault windows
(bench/soak.py): the parts of its verdict that are arithmetic."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import soak


def sample(minute: float, **rss: float) -> soak.Sample:
    return soak.Sample(60 * minute, dict(rss), {}, 0, 0, None, None)


def test_a_leak_is_measured_after_the_first_five_minutes_and_warm_up_is_not() -> None:
    # "gw" fills its caches in the first five minutes, then stays flat; "leaky" grows
    # 2 MB a minute throughout.
    samples = [sample(m, **{"gw 1": 60 + 4 * min(m, 5), "leaky 2": 50 + 2 * m}) for m in range(31)]
    grow = soak.growth(samples)
    assert grow["gw 1"].creep is not None and abs(grow["gw 1"].creep) < 0.01
    assert grow["leaky 2"].creep is not None and abs(grow["leaky 2"].creep - 2) < 0.01


def test_a_step_while_a_fault_lasts_is_not_creep_and_shows_in_every_reading() -> None:
    # 20 MB more from the broker's restart at minute 10, flat before and after.
    fault = soak.Fault("RabbitMQ restarted", start=600.0, end=615.0)
    samples = [sample(m, **{"gw 1": 80 + (20 if m >= 10 else 0)}) for m in range(31)]
    grow = soak.growth(samples, [fault])["gw 1"]
    assert grow.creep is not None and abs(grow.creep) < 0.01
    assert grow.overall is not None and grow.overall > 0.5
    # Creep between faults is seen all the same.
    samples = [sample(m, **{"gw 1": 80 + 1.5 * m + (20 if m >= 10 else 0)}) for m in range(31)]
    grow = soak.growth(samples, [fault])["gw 1"]
    assert grow.creep is not None and abs(grow.creep - 1.5) < 0.01


def test_a_process_started_late_is_judged_from_its_own_fifth_minute() -> None:
    # Started again at minute 10 (its predecessor killed): it warms up until 15, then
    # is flat; one started at minute 27 has too few minutes to judge.
    samples = [sample(m, **{"consumer 3": 40 + 5 * min(m - 10, 5)}) for m in range(10, 31)] + [
        sample(m, **{"consumer 4": 40 + m}) for m in range(27, 31)
    ]
    grow = soak.growth(samples)
    assert grow["consumer 3"].creep is not None and abs(grow["consumer 3"].creep) < 0.01
    assert grow["consumer 4"].creep is None


def test_a_fault_window_covers_its_minutes_and_thirty_seconds_after() -> None:
    fault = soak.Fault("RabbitMQ restarted", start=330.0, end=345.0)
    assert [m for m in range(10) if fault.touches(m)] == [5, 6]
    short = soak.Fault("Redis restarted", start=200.0, end=201.0)
    assert [m for m in range(10) if short.touches(m)] == [3]
    # Still going at the end of the run: every minute from its start.
    unfinished = soak.Fault("PostgreSQL restarted", start=500.0)
    assert [m for m in range(10) if unfinished.touches(m)] == [8, 9]


def test_the_generators_lines_are_tallied() -> None:
    tally = soak.Tally("t")
    for line in (
        "coupon SOAK_t_WARM_000 1000000",
        "claim 1500000 20000 200 0 soak_t_00001 SOAK_t_WARM_000 1e3d9d86-231b-4295",
        "claim 2500000 3000000 409 2 soak_t_00001 SOAK_t_WARM_000 -",
        "retry 3000000 1000 200 1",
        "read 3100000 500 200",
        "mismatch retry of k: 400 {}, first 200 {}",
        "done 5 5 0",
    ):
        tally.feed(line)
    assert tally.stocks == {"SOAK_t_WARM_000": 1_000_000}
    assert tally.answers == [
        ("soak_t_00001", "SOAK_t_WARM_000", 200, "1e3d9d86-231b-4295"),
        ("soak_t_00001", "SOAK_t_WARM_000", 409, None),
    ]
    assert tally.retried == 1
    assert tally.kinds == {"claim": 2, "retry": 1, "read": 1}
    # Claims and keyed retries by the second they were due in; reads apart.
    assert sorted(tally.claims.per_second) == [1, 2, 3]
    assert tally.claims.per_second[2].get_max_value() >= 2_990_000
    assert sorted(tally.others.per_second) == [3]
    assert tally.mismatches == ["retry of k: 400 {}, first 200 {}"]
