"""Structured logging: one JSON object per line, configured only by entry points.

Every line has ``time`` (ISO 8601, UTC), ``level``, ``service``, ``logger`` and ``event``
(what happened, a short fixed phrase). Where they apply it also has, under these names
and no others: ``request_id`` (the HTTP request's id, or the claim's), ``trace_id``,
``span_id``, ``message_id`` (an AMQP message), ``coupon``, ``outcome``, ``duration_ms``,
and ``error``. Fields that hold for a whole piece of work (an HTTP request) are bound
once with :func:`bind` and appear on every line logged within it, by any module. No
personal data beyond ids is logged: user ids are ids, and nothing else of a client is.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from pythonjsonlogger.orjson import OrjsonFormatter

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

_NOTHING: Mapping[str, Any] = MappingProxyType({})
_bound: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "flashclaim_log_fields", default=_NOTHING
)


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every line logged in this block (this task and what it
    awaits); ``None`` values are left out."""
    token = _bound.set({**_bound.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _bound.reset(token)


class _Formatter(OrjsonFormatter):
    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        for key, value in _bound.get().items():
            log_data.setdefault(key, value)
        if (ids := tracing.ids()) is not None:  # the span this line was logged in
            log_data.setdefault("trace_id", ids[0])
            log_data.setdefault("span_id", ids[1])


class _TextFormatter(_Formatter):
    """The same fields as the JSON lines, for a person: ``12:00:01 INFO  gateway
    request  method=POST path=/api/coupons/claim status=200 ...``."""

    def jsonify_log_record(self, log_data: dict[str, Any]) -> str:
        data = dict(log_data)
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
    return (_TextFormatter if text else _Formatter)(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger", "message": "event"},
        static_fields={"service": service},
        timestamp="time",
    )


def as_text(log_format: str) -> bool:
    """Whether lines are written for a person: ``text``, or ``auto`` on a terminal."""
    return log_format == "text" or (log_format == "auto" and sys.stderr.isatty())


def configure(level: str, service: str, log_format: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(service, as_text(log_format)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter stays at warnings unless asked for.
    for noisy in ("aio_pika", "aiormq", "psycopg.pool", "yoyo"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # Warnings (deprecations, resource warnings) become log lines too, not bare stderr.
    logging.captureWarnings(True)
