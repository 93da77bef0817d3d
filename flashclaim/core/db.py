"""PostgreSQL access: the named queries, the connection pool and the schema's
migrations (yoyo, plain SQL files in ``flashclaim/core/migrations``)."""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool
from yoyo import read_migrations
from yoyo.backends.core.postgresql import PostgresqlPsycopgBackend
from yoyo.connections import DatabaseURI

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
# Where yoyo records what it applied (its lock table is yoyo_lock).
MIGRATIONS_TABLE = "_yoyo_migration"


_LEADING_COMMENTS = re.compile(r"\A(?:\s*--[^\n]*\n)+\s*")


@functools.cache
def queries() -> dict[str, str]:
    """Every statement of ``queries.sql`` by name, parsed once; the comment above a
    statement stays in the file (the statement's name is what traces and logs show)."""
    text = importlib.resources.files("flashclaim.core").joinpath("queries.sql").read_text()
    parts = _NAME.split(text)
    return {
        name: _LEADING_COMMENTS.sub("", body.strip()).rstrip(";")
        for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


def schema_sql() -> str:
    """The whole schema, readable in one file (what the migrations add up to)."""
    return importlib.resources.files("flashclaim.core").joinpath("schema.sql").read_text()


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


async def configure_session(conn: psycopg.AsyncConnection[Any]) -> None:
    """Settings of every service connection.

    ``plan_cache_mode = force_custom_plan``: psycopg prepares a statement after a few
    executions, and PostgreSQL would then reuse one generic plan, made when the tables
    were as small as at the start of a sale. A plan that scans a table of a hundred rows
    goes on scanning it at a hundred thousand until autovacuum's next analyze (up to a
    minute later): a batch's probes of the claims then took 144 ms instead of 0.1. Each
    execution is planned for the tables as they are (planning these statements costs
    a few tens of microseconds).
    """
    await conn.execute("SET plan_cache_mode = force_custom_plan")
    await conn.commit()


async def opened(pool: AsyncConnectionPool, timeout: float = 30) -> bool:
    """Open ``pool`` and wait for its first connections; ``True`` (for
    :meth:`flashclaim.core.runtime.Runtime.until_stopped`)."""
    await pool.open(wait=True, timeout=timeout)
    return True


def create_pool(
    conninfo: str,
    min_size: int,
    max_size: int,
    name: str,
    configure: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] = configure_session,
) -> AsyncConnectionPool:
    """A pool that is opened by the caller (``await pool.open()``); ``configure`` sets
    up each new connection (a service adding settings of its own calls
    :func:`configure_session` from it)."""
    return AsyncConnectionPool(
        conninfo,
        min_size=min_size,
        max_size=max_size,
        open=False,
        name=name,
        kwargs={"application_name": name},
        configure=configure,
        # A connection that died with its server is detected before it is handed out.
        check=AsyncConnectionPool.check_connection,
    )
