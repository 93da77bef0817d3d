"""Which faults are transient, and the one retry policy applied to them."""

from __future__ import annotations

import psycopg
import redis.exceptions
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

# Database faults that a retry can cure: the server went away, or the transaction lost
# a race (serialization failure, deadlock) and may simply run again.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57P")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, psycopg.OperationalError | psycopg.errors.InterfaceError):
        return True
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate or ""
        return state.startswith(_TRANSIENT_SQLSTATE_CLASSES)
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return True
    return isinstance(exc, ConnectionError | TimeoutError)


def transient_retry(max_seconds: float) -> AsyncRetrying:
    """Exponential backoff with jitter, for at most ``max_seconds``, on transient faults."""
    return AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.05),
        stop=stop_after_delay(max_seconds),
        reraise=True,
    )
