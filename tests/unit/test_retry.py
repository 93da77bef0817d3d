"""Which database errors hold the work (outage), run it again (lost race), or count as
the command's failure: the consumer's behaviour under each fault depends on it."""

from __future__ import annotations

import psycopg
import psycopg.errors
import pytest
import redis.exceptions
from psycopg_pool import PoolTimeout

from flashclaim.core.retry import is_contention, is_outage, is_transient


def error(sqlstate: str) -> psycopg.Error:
    return psycopg.errors.lookup(sqlstate)("simulated")


@pytest.mark.parametrize(
    "sqlstate",
    ["08006", "08001", "25006", "53100", "53200", "53300", "57014", "57P01", "57P03", "58030"],
)
def test_outages_hold_the_work(sqlstate: str) -> None:
    assert is_outage(error(sqlstate)) and not is_contention(error(sqlstate))


@pytest.mark.parametrize("sqlstate", ["40001", "40P01", "55P03"])
def test_lost_races_run_again(sqlstate: str) -> None:
    assert is_contention(error(sqlstate)) and not is_outage(error(sqlstate))


@pytest.mark.parametrize("sqlstate", ["23505", "23503", "22001", "42P01", "P0001"])
def test_the_commands_own_failures_are_neither(sqlstate: str) -> None:
    """A constraint, a bad value, a missing table, a trigger's RAISE: retrying at once
    cannot help; they are counted as failed attempts (and end in the DLQ)."""
    assert not is_transient(error(sqlstate))


def test_no_answer_from_the_server_is_an_outage() -> None:
    assert is_outage(psycopg.OperationalError("connection lost"))  # no SQLSTATE
    assert is_outage(PoolTimeout("no connection in time"))
    assert is_outage(psycopg.InterfaceError("connection closed"))
    assert is_outage(ConnectionRefusedError())
    assert not is_outage(ValueError("a bug"))


def test_redis_faults_are_transient_but_not_database_outages() -> None:
    fault = redis.exceptions.ConnectionError("gone")
    assert is_transient(fault) and not is_outage(fault)
