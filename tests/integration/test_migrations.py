"""Migrations from an empty database produce exactly ``schema.sql``, and run once."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from psycopg.types.json import Jsonb

from flashclaim.core.db import schema_sql
from flashclaim.core.schema_migrations import migrate, pending_migrations
from flashclaim.devtools import schemafile
from flashclaim.devtools.devstack import Stack

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS_DIR = ROOT / "flashclaim" / "core" / "migrations"
MIGRATIONS = sorted(p.stem for p in MIGRATIONS_DIR.glob("*.sql"))


def test_schema_sql_is_what_the_migrations_add_up_to(
    stack: Stack, new_database: Callable[[], str]
) -> None:
    """schema.sql is the migrated catalog as pg_dump writes it (``make generate`` writes
    it), and building a database from it gives that catalog."""
    assert stack.postgres is not None
    bindir = Path(stack.postgres.bindir)
    migrated, built = new_database(), new_database()
    assert pending_migrations(migrated) == MIGRATIONS
    migrate(migrated)
    assert pending_migrations(migrated) == []
    expected = schemafile.render(schemafile.pg_dump(migrated, bindir))
    assert schema_sql() == expected, "schema.sql is out of date: run `make generate`"
    assert "CREATE TABLE public.inbox" in expected and "COMMENT ON TABLE public.claims" in expected
    with psycopg.connect(built, autocommit=True) as conn:
        conn.execute(schema_sql().encode())
    assert schemafile.render(schemafile.pg_dump(built, bindir)) == expected


def test_migrations_run_once_and_leave_a_database_built_before_them_alone(
    new_database: Callable[[], str],
) -> None:
    """A database made by the schema.sql of the releases before migrations (the text of
    the first migration) takes that migration as a no-op; applying again changes nothing."""
    database = new_database()
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute((MIGRATIONS_DIR / "0001_initial.sql").read_bytes())
        conn.execute("INSERT INTO coupons (name, amount, remaining_amount) VALUES ('KEPT', 3, 3)")
    assert migrate(database) == MIGRATIONS
    assert migrate(database) == []
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT name FROM coupons").fetchall() == [("KEPT",)]
        assert conn.execute("SELECT count(*) FROM _yoyo_migration").fetchone() == (len(MIGRATIONS),)


def test_the_schema_commands_say_what_is_pending_and_apply_it(
    new_database: Callable[[], str],
) -> None:
    database = new_database()
    env = {"FLASHCLAIM_DATABASE_URL": database, "PATH": "/usr/bin:/bin"}

    def schema(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flashclaim.cli", "schema", action],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    status = schema("status")
    assert (status.returncode, status.stdout.strip()) == (1, f"pending: {', '.join(MIGRATIONS)}")
    applied = schema("apply")
    assert applied.returncode == 0
    assert f"applied {', '.join(MIGRATIONS)}" in applied.stderr
    status = schema("status")
    assert (status.returncode, status.stdout.strip()) == (0, "up to date")
    env["FLASHCLAIM_DATABASE_URL"] = "postgresql://x@127.0.0.1:1/x?connect_timeout=1"
    unreachable = schema("status")
    assert unreachable.returncode == 2 and "cannot reach the database" in unreachable.stderr


def test_outcomes_are_backfilled_and_derived_from_an_older_consumers_answers(
    new_database: Callable[[], str],
) -> None:
    """0005 keeps outcomes instead of HTTP answers: the rows answered before get theirs
    from the answer they kept, and a consumer of the release before, still running
    while the new one rolls out, has its answer turned into an outcome as it writes."""
    database = new_database()
    migrate(database, upto="0004_observability")
    answered = {
        "claimed": (200, {"status": "claimed"}),
        "already_claimed": (409, {"code": "already_claimed"}),
        "out_of_stock": (400, {"code": "out_of_stock"}),
        "coupon_not_found": (404, {"code": "coupon_not_found"}),
    }
    insert = (
        "INSERT INTO inbox (message_id, sender, event_type, payload, status, result_status,"
        " result_body) VALUES (%s, 't', 'x', '{}', %s, %s, %s)"
    )
    ids = {code: uuid.uuid4() for code in answered}
    with psycopg.connect(database, autocommit=True) as conn:
        for code, (status, body) in answered.items():
            conn.execute(insert, (ids[code], "PROCESSED", status, Jsonb(body)))
    assert migrate(database) == MIGRATIONS[4:]
    with psycopg.connect(database, autocommit=True) as conn:
        for code in answered:
            assert conn.execute(
                "SELECT outcome FROM inbox WHERE message_id = %s", (ids[code],)
            ).fetchone() == (code,)
        pending = uuid.uuid4()
        conn.execute(insert, (pending, "PENDING", None, None))
        conn.execute(  # record_results as the release before wrote it
            "UPDATE inbox SET status = 'PROCESSED', result_status = 409,"
            " result_body = %s WHERE message_id = %s",
            (Jsonb({"code": "already_claimed"}), pending),
        )
        assert conn.execute(
            "SELECT outcome FROM inbox WHERE message_id = %s", (pending,)
        ).fetchone() == ("already_claimed",)
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "UPDATE inbox SET status = 'PROCESSED', outcome = NULL WHERE message_id = %s",
                (ids["claimed"],),
            )
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "UPDATE inbox SET outcome = 'maybe' WHERE message_id = %s", (ids["claimed"],)
            )
