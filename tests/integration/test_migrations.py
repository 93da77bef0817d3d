"""Migrations from an empty database produce exactly ``schema.sql``, and run once."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from flashclaim.core.db import migrate, pending_migrations, schema_sql
from flashclaim.core.settings import Settings
from flashclaim.devtools.devstack import Stack


@pytest.fixture
def new_database(stack: Stack, settings: Settings) -> Iterator[Callable[[], str]]:
    """Makes empty databases on the suite's server (owned by the services' role), all
    dropped afterwards."""
    if stack.postgres is None:
        pytest.skip("creates databases: needs the suite's own PostgreSQL")
    admin = make_conninfo(settings.database_url, user="postgres", dbname="postgres")
    owner = conninfo_to_dict(settings.database_url)["user"]
    made: list[str] = []

    def make() -> str:
        name = f"m_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
        made.append(name)
        return make_conninfo(settings.database_url, dbname=name)

    yield make
    with psycopg.connect(admin, autocommit=True) as conn:
        for name in made:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def dump(stack: Stack, conninfo: str) -> str:
    """The schema as pg_dump writes it, without yoyo's own tables, comments, and the
    random key of pg_dump's \\restrict guard lines."""
    assert stack.postgres is not None
    params = conninfo_to_dict(conninfo)
    out = subprocess.run(
        [
            str(Path(stack.postgres.bindir) / "pg_dump"),
            "--schema-only",
            "--no-owner",
            "--exclude-table=_yoyo*",
            "--exclude-table=yoyo_lock",
            f"--host={params['host']}",
            f"--port={params['port']}",
            f"--username={params['user']}",
            str(params["dbname"]),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return "\n".join(
        line
        for line in out.splitlines()
        if line.strip() and not re.match(r"\s*--|\\(un)?restrict ", line)
    )


def test_migrating_an_empty_database_gives_exactly_schema_sql(
    stack: Stack, new_database: Callable[[], str]
) -> None:
    migrated, built = new_database(), new_database()
    assert pending_migrations(migrated) == ["0001_initial"]
    migrate(migrated)
    assert pending_migrations(migrated) == []
    with psycopg.connect(built, autocommit=True) as conn:
        conn.execute(schema_sql().encode())
    assert dump(stack, migrated) == dump(stack, built)
    assert "CREATE TABLE public.inbox" in dump(stack, migrated)


def test_migrations_run_once_and_leave_a_database_built_before_them_alone(
    new_database: Callable[[], str],
) -> None:
    """A database made by the schema.sql of earlier releases takes the first migration
    as a no-op; applying again changes nothing."""
    database = new_database()
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(schema_sql().encode())
        conn.execute("INSERT INTO coupons (name, amount, remaining_amount) VALUES ('KEPT', 3, 3)")
    assert migrate(database) == ["0001_initial"]
    assert migrate(database) == []
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT name FROM coupons").fetchall() == [("KEPT",)]
        assert conn.execute("SELECT count(*) FROM _yoyo_migration").fetchone() == (1,)


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
    assert (status.returncode, status.stdout.strip()) == (1, "pending: 0001_initial")
    applied = schema("apply")
    assert applied.returncode == 0 and "applied 0001_initial" in applied.stderr
    status = schema("status")
    assert (status.returncode, status.stdout.strip()) == (0, "up to date")
    env["FLASHCLAIM_DATABASE_URL"] = "postgresql://x@127.0.0.1:1/x?connect_timeout=1"
    unreachable = schema("status")
    assert unreachable.returncode == 2 and "cannot reach the database" in unreachable.stderr
