"""The live view of a sale's arithmetic (flashclaim/ops/live.py): its figures read from the
services' own exposition, summed over pages, and rates across the readings of a window."""

from __future__ import annotations

from prometheus_client import generate_latest

from flashclaim.core.metrics import ConsumerMetrics, GatewayMetrics
from flashclaim.ops.live import FIGURES, Rates, figures


def gateway_page(granted: int, out_of_stock: int, held: int, overloaded: int) -> str:
    m = GatewayMetrics()
    for _ in range(granted):
        m.claim_answered("claimed", "round_trip")
    for _ in range(out_of_stock):
        m.claim_answered("out_of_stock", "gateway")
    m.flush()
    m.held.set(held)
    m.http_errors.labels("overloaded").inc(overloaded)
    m.http_errors.labels("bad_request").inc(5)
    return generate_latest(m.registry).decode()


def test_figures_are_read_from_the_services_exposition_and_summed_over_pages() -> None:
    pages = [gateway_page(3, 4, 2, 1), gateway_page(10, 0, 5, 0)]
    found = figures(pages)
    assert found["answered"] == 17
    assert found["granted"] == 13
    assert found["held"] == 7
    assert found["overloaded"] == 1  # bad requests are not refusals for load
    assert found["unavailable"] == 0  # described, none counted
    assert found["in_flight"] == 0
    # No consumer page listed: its figures are unknown, not zero.
    assert found["consumers_holding"] is None
    consumer = ConsumerMetrics()
    consumer.holding.set(1)
    found = figures([*pages, generate_latest(consumer.registry).decode()])
    assert found["consumers_holding"] == 1
    assert set(found) == set(FIGURES)


def test_no_page_read_gives_no_figure() -> None:
    assert figures([]) == dict.fromkeys(FIGURES)


def test_a_rate_spans_the_readings_of_the_window() -> None:
    rates = Rates(window=10.0)
    assert rates.read("k", 100, now=0.0) is None  # one reading: no rate yet
    assert rates.read("k", 120, now=2.0) == 10.0
    assert rates.read("k", 160, now=4.0) == 15.0  # (160 - 100) / 4
    for t in range(6, 31, 2):
        rates.read("k", 160 + 10 * (t - 4), now=float(t))
    # Well after the window, the rate is that of the last ten seconds or so.
    assert rates.read("k", 440, now=32.0) == 10.0
    assert rates.read("other", 5, now=32.0) is None  # keys are apart


def test_a_figure_that_went_down_starts_over_instead_of_a_negative_rate() -> None:
    rates = Rates(window=10.0)
    rates.read("k", 500, now=0.0)
    assert rates.read("k", 20, now=2.0) is None  # its gateway restarted
    assert rates.read("k", 40, now=4.0) == 10.0


def test_keys_not_read_for_a_while_are_forgotten_and_their_number_is_bounded() -> None:
    rates = Rates(window=1.0, most_keys=3)
    for i in range(10):
        rates.read(f"coupon {i}", 1, now=float(i) * 0.01)
    assert len(rates._seen) <= 3
    rates.read("late", 1, now=100.0)
    assert list(rates._seen) == ["late"]
