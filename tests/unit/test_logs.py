"""The log line schema, and fields bound for a piece of work."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from flashclaim.core import logs
from flashclaim.core.http import CanonicalAccessLogger


def line(logger: logging.Logger, message: str, **extra: object) -> dict[str, object]:
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return dict(orjson.loads(logs.formatter("gateway").format(record)))


def test_every_line_has_the_schema_s_fixed_fields() -> None:
    out = line(logging.getLogger("flashclaim.x"), "consumer started", coupon="PROMO")
    assert {k: out[k] for k in ("level", "service", "logger", "event", "coupon")} == {
        "level": "INFO",
        "service": "gateway",
        "logger": "flashclaim.x",
        "event": "consumer started",
        "coupon": "PROMO",
    }
    assert dt.datetime.fromisoformat(str(out["time"])).utcoffset() == dt.timedelta(0)
    assert "message" not in out and "ts" not in out


def test_the_bound_request_id_is_on_every_line_within_and_gone_after() -> None:
    log = logging.getLogger("flashclaim.y")
    token = logs.bind_request("h1")
    try:
        assert line(log, "inside")["http_request_id"] == "h1"
        assert line(log, "explicit", http_request_id="h2")["http_request_id"] == "h2"
    finally:
        logs.unbind_request(token)
    assert "http_request_id" not in line(log, "after")


async def test_the_bound_request_id_stays_with_its_own_task() -> None:
    log = logging.getLogger("flashclaim.z")
    seen: dict[str, object] = {}

    async def work(name: str) -> None:
        token = logs.bind_request(name)
        await asyncio.sleep(0.01)
        seen[name] = line(log, "work")["http_request_id"]
        logs.unbind_request(token)

    await asyncio.gather(work("a"), work("b"))
    assert seen == {"a": "a", "b": "b"}


def test_a_person_reads_the_same_fields_as_one_line_of_text() -> None:
    log = logging.getLogger("flashclaim.z")
    record = log.makeRecord(log.name, logging.WARNING, __file__, 1, "batch done", (), None)
    record.__dict__.update({"size": 3, "coupon": "PROMO", "error": "two words"})
    text = logs.formatter("consumer", text=True).format(record)
    clock, level, service, rest = text.split(maxsplit=3)
    assert dt.time.fromisoformat(clock) and (level, service) == ("WARNING", "consumer")
    assert rest.startswith("batch done")
    assert 'size=3 coupon=PROMO error="two words"' in rest
    assert "\n" not in text and "{" not in text


def test_text_is_chosen_on_a_terminal_only_unless_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for tty in (True, False):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
        assert logs.as_text("auto") is tty
        assert logs.as_text("json") is False
        assert logs.as_text("text") is True


@pytest.mark.parametrize(
    ("path", "status", "logged"),
    [
        ("/metrics", 200, False),
        ("/readyz", 200, False),
        ("/healthz", 200, False),
        ("/readyz", 503, True),  # a failing probe is worth a line
        ("/api/coupons/claim", 200, True),
    ],
)
def test_routine_scrapes_and_probes_that_succeed_write_no_access_line(
    path: str, status: int, logged: bool, caplog: pytest.LogCaptureFixture
) -> None:
    access = logging.getLogger("flashclaim.access-test")
    caplog.set_level(logging.INFO, logger=access.name)
    writer = CanonicalAccessLogger(access, "")
    writer.log(make_mocked_request("GET", path), web.Response(status=status), 0.001)
    assert bool([r for r in caplog.records if r.name == access.name]) is logged


def test_an_error_carries_its_traceback_and_any_extra_is_written() -> None:
    log = logging.getLogger("flashclaim.e")
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        record = log.makeRecord(
            log.name, logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info()
        )
    record.__dict__.update({"when": dt.date(2026, 12, 1), "size": 3})
    out = dict(orjson.loads(logs.formatter("relay").format(record)))
    assert out["event"] == "failed x"
    assert "ZeroDivisionError: division by zero" in str(out["exc_info"])
    assert (out["when"], out["size"]) == ("2026-12-01", 3)
    assert not {"args", "msg", "levelno", "pathname", "exc_text"} & set(out)
