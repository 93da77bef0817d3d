"""The schema's migrations: yoyo, plain SQL files in ``flashclaim/core/migrations``.

Run by ``flashclaim migrate`` (a job before the services start), by the local stack and
by the tests; never loaded by the gateway, the consumer or the relay (yoyo and what it
brings cost every process a few MB: pyproject.toml's import contracts keep it out).
"""

from __future__ import annotations

import contextlib
import importlib.resources
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from yoyo import read_migrations
from yoyo.backends.core.postgresql import PostgresqlPsycopgBackend
from yoyo.connections import DatabaseURI

# Where yoyo records what it applied (its lock table is yoyo_lock).
MIGRATIONS_TABLE = "_yoyo_migration"


class _Backend(PostgresqlPsycopgBackend):  # type: ignore[misc]
    """yoyo's psycopg 3 backend, connecting with our libpq connection string as it is
    (multi-host URLs and every libpq parameter included) instead of yoyo's URL parser."""

    def connect(self, dburi: DatabaseURI) -> psycopg.Connection[Any]:
        self.schema = None
        return psycopg.connect(dburi.args["conninfo"], autocommit=True)


def _uri(conninfo: str) -> DatabaseURI:
    """What yoyo keeps of a database: its name, and here the connection string whole."""
    dbname = conninfo_to_dict(conninfo).get("dbname") or ""
    return DatabaseURI("postgresql+psycopg", None, None, None, None, dbname, {"conninfo": conninfo})


@contextlib.contextmanager
def _migrations(conninfo: str) -> Iterator[tuple[Any, Any]]:
    with (
        importlib.resources.as_file(
            importlib.resources.files("flashclaim.core").joinpath("migrations")
        ) as folder,
        _Backend(_uri(conninfo), MIGRATIONS_TABLE) as backend,
    ):
        backend.init_database()  # yoyo's own tables, if missing
        yield backend, read_migrations(str(folder))


def pending_migrations(conninfo: str) -> list[str]:
    """The ids of the migrations not applied to this database yet, in order."""
    with _migrations(conninfo) as (backend, migrations):
        return [m.id for m in backend.to_apply(migrations)]


def migrate(conninfo: str, upto: str | None = None) -> list[str]:
    """Apply every pending migration (``flashclaim/core/migrations/*.sql``, yoyo), or
    those up to the id ``upto``, each in its own transaction, under yoyo's lock so that
    concurrent runs apply each once; return the ids applied."""
    with _migrations(conninfo) as (backend, migrations), backend.lock():
        todo = backend.to_apply(migrations)
        if upto is not None:
            todo = type(todo)([m for m in todo if m.id <= upto], todo.post_apply)
        backend.apply_migrations(todo)
        return [m.id for m in todo]
