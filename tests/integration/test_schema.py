"""The database itself enforces the invariants, and the schema applies twice."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from flashclaim.db import apply_schema
from flashclaim.settings import Settings
from tests.conftest import create_coupon_row


def test_schema_applies_twice(settings: Settings) -> None:
    apply_schema(settings.database_url)
    apply_schema(settings.database_url)


def test_database_refuses_what_the_code_must_never_do(settings: Settings, coupon_name: str) -> None:
    create_coupon_row(settings.database_url, coupon_name, 1)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        insert = "INSERT INTO claims (coupon_name, user_id, message_id) VALUES (%s, %s, %s)"
        conn.execute(insert, (coupon_name, "alice", uuid.uuid4()))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(insert, (coupon_name, "alice", uuid.uuid4()))
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute(insert, (f"NOPE_{coupon_name}", "bob", uuid.uuid4()))
        with pytest.raises(psycopg.errors.CheckViolation):
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
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(inbox, (message_id,))
