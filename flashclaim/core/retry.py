"""Which faults are transient, and the retry policy applied to them.

Two kinds of transient database fault are told apart:

- an **outage** (the server is unreachable or shutting down): nothing is wrong with the
  work, so it is held, not counted as a failed attempt, and retried until the server is
  back;
- **contention** (serialization failure, deadlock, lock timeout): the transaction lost a
  race and simply runs again, a bounded number of times.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import psycopg
import redis.exceptions
from psycopg_pool import PoolTimeout
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from flashclaim.core.errors import DependencyUnavailable

# SQLSTATEs (prefixes) that say the database cannot do any work now, whatever the work:
# 08 connection exceptions; 25006 read-only transaction (a standby, or a primary
# demoted by a failover); 53 insufficient resources (53100 disk full, 53200 out of
# memory, 53300 too many connections); 57014 query cancelled (statement timeout);
# 57P01-57P05 admin/crash shutdown, cannot connect now, idle session timeouts; 58 system
# errors (I/O). Retrying cures none of them quickly, and none is the command's fault:
# the consumer holds its messages instead of spending their attempts.
_OUTAGE_SQLSTATES = ("08", "25006", "53", "57014", "57P", "58")
# 40001 serialization failure, 40P01 deadlock, 55P03 lock not available.
_CONTENTION_SQLSTATES = ("40001", "40P01", "55P03")


def is_outage(exc: BaseException) -> bool:
    """The database cannot be reached now; the work itself is fine."""
    if isinstance(exc, PoolTimeout | psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if state is None:
            # No server answer at all (the connection broke): an outage.
            return isinstance(exc, psycopg.OperationalError)
        return state.startswith(_OUTAGE_SQLSTATES)
    return isinstance(exc, OSError)


def is_contention(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.Error) and (exc.sqlstate or "") in _CONTENTION_SQLSTATES


def is_transient(exc: BaseException) -> bool:
    if is_outage(exc) or is_contention(exc):
        return True
    # Redis faults reach callers as DependencyUnavailable (core/results.py).
    return isinstance(
        exc,
        DependencyUnavailable | redis.exceptions.ConnectionError | redis.exceptions.TimeoutError,
    )


def contention_retry(attempts: int = 5) -> AsyncRetrying:
    """Run a transaction again after a lost race: backoff with jitter, bounded."""
    return AsyncRetrying(
        retry=retry_if_exception(is_contention),
        wait=wait_exponential_jitter(multiplier=0.02, max=0.5, jitter=0.05),
        stop=stop_after_attempt(attempts),
        reraise=True,
    )


def transient_retry(max_seconds: float) -> AsyncRetrying:
    """Exponential backoff with jitter, for at most ``max_seconds``, on transient faults."""
    return AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.05),
        stop=stop_after_delay(max_seconds),
        reraise=True,
    )


def outage_retry(
    stop: asyncio.Event, on_outage: Callable[[RetryCallState], Awaitable[None]]
) -> AsyncRetrying:
    """Retry through a database outage for as long as it lasts, until ``stop`` is set.

    ``on_outage`` runs before each pause (the caller stops taking new work there).
    """
    return AsyncRetrying(
        retry=retry_if_exception(is_outage),
        wait=wait_exponential_jitter(multiplier=0.1, max=2.0, jitter=0.1),
        stop=lambda state: stop.is_set(),
        before_sleep=on_outage,
        reraise=True,
    )


def outage_wait(max_seconds: float, before_sleep: Callable[[RetryCallState], None]) -> Retrying:
    """Wait up to ``max_seconds`` for a database that cannot be reached yet (a server
    still starting beside a one-shot command: ``flashclaim schema apply --wait``),
    backing off to 5 s; ``before_sleep`` reports each pause. Synchronous."""
    return Retrying(
        retry=retry_if_exception(is_outage),
        wait=wait_exponential_jitter(initial=0.25, max=5.0, jitter=0.1),
        stop=stop_after_delay(max_seconds),
        before_sleep=before_sleep,
        reraise=True,
    )
