"""The database itself enforces the invariants, and the migrations apply once."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from flashclaim.core.schema_migrations import migrate
from flashclaim.core.settings import Settings


@contextlib.contextmanager
def rollback(conn: psycopg.Connection[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        conn.rollback()


def test_schema_applies_twice(settings: Settings) -> None:
    migrate(settings.database_url)
    assert migrate(settings.database_url) == []


def test_database_refuses_what_the_code_must_never_do(settings: Settings, coupon_name: str) -> None:
    # Everything here is rolled back: the rows written by hand would (rightly) fail
    # `flashclaim audit`, which other tests run over the whole database.
    with psycopg.connect(settings.database_url) as conn, rollback(conn):
        conn.execute(
            "INSERT INTO coupons (name, amount, remaining_amount) VALUES (%s, 1, 1)",
            (coupon_name,),
        )
        insert = "INSERT INTO claims (coupon_name, user_id, message_id) VALUES (%s, %s, %s)"
        conn.execute(insert, (coupon_name, "alice", uuid.uuid4()))
        with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
            conn.execute(insert, (coupon_name, "alice", uuid.uuid4()))
        with pytest.raises(psycopg.errors.ForeignKeyViolation), conn.transaction():
            conn.execute(insert, (f"NOPE_{coupon_name}", "bob", uuid.uuid4()))
        with pytest.raises(psycopg.errors.CheckViolation), conn.transaction():
            conn.execute(
                "UPDATE coupons SET remaining_amount = remaining_amount - 2 WHERE name = %s",
                (coupon_name,),
            )
        inbox = (
            "INSERT INTO inbox (message_id, sender, event_type, payload) "
            "VALUES (%s, 'test', 'x', '{}')"
        )
        message_id = uuid.uuid4()
        conn.execute(inbox, (message_id,))
        with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
            conn.execute(inbox, (message_id,))
