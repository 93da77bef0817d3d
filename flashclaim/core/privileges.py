"""What the services' own accounts may do on each server, and nothing more.

The gateway, the consumers, the relay and the operators' commands each connect with
an account of least privilege; the schema, the broker's policies and the accounts
themselves are the work of an owner or administrator account, used only by the schema
job and whoever deploys. This module is the one statement of those privileges: the
local stack (``make run``) and the schema command apply it, and the tests check the
shipped Compose and Kubernetes files against it.

- **PostgreSQL**: the services' role reads and writes the rows of flashclaim's tables,
  and reads (only) the migrations' records. It owns nothing, so it can run no DDL
  (``DROP``, ``ALTER``, ``CREATE`` in the schema: PostgreSQL 15 gives ``PUBLIC`` no
  ``CREATE`` there), nor ``TRUNCATE``. Migrations run as the database's owner, which then
  grants these (``flashclaim schema apply --grant-to ROLE``).
- **RabbitMQ**: the services' user may configure, write and read only the exchanges
  and queues of its namespace (``<namespace>.*``), and has no tag: no management API,
  no policies. Policies are set by an administrator (``flashclaim topology apply`` run
  with the administrator's URLs), by a definitions file, or by the operator.
- **Redis**: the services' user may run only the commands flashclaim sends, on keys and
  channels of its namespace (``<namespace>:*``).
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg import sql

from flashclaim.core.errors import ConfigError

# yoyo's bookkeeping: readable by the services (`schema status`), never writable.
_MIGRATION_TABLES = ("_yoyo_migration", "_yoyo_log", "_yoyo_version", "yoyo_lock")


def grant_services(conninfo: str, role: str) -> None:
    """Give ``role`` the services' privileges on the schema at ``conninfo`` (idempotent;
    run as the tables' owner after each migration: tables added later get them too)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
            raise ConfigError(f"no database role {role!r}: create it first (CREATE ROLE ... LOGIN)")
        who = sql.Identifier(role)
        public = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        tables = [name for (name,) in conn.execute(public)]
        with conn.transaction():
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(who))
            # PostgreSQL 15's default; older servers (and databases made from an old
            # template) let every role create in public (CVE-2018-1058).
            conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM {}").format(who))
            for table in tables:
                rows = "SELECT" if table in _MIGRATION_TABLES else "SELECT, INSERT, UPDATE, DELETE"
                grant = sql.SQL("GRANT {} ON {} TO {}")
                conn.execute(grant.format(sql.SQL(rows), sql.Identifier(table), who))
            conn.execute(
                sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {}").format(who)
            )


def broker_permissions(namespace: str) -> dict[str, str]:
    """The services' user's permissions on its virtual host (configure, write, read:
    each a regular expression of exchange and queue names)."""
    mine = f"^{re.escape(namespace)}\\."
    return {"configure": mine, "write": mine, "read": mine}


# Every command flashclaim's services send to Redis, including those its scripts call
# (Redis checks a script's calls against the user's rules) and the ping behind
# readiness. (The client library's CLIENT SETINFO at connection, Redis 7.2 and later,
# may be refused: the library ignores its answer.)
REDIS_COMMANDS = (
    "get",
    "set",
    "mget",
    "eval",
    "evalsha",
    "script|load",
    "publish",
    "subscribe",
    "unsubscribe",
    "ping",
    "time",
    "hmget",
    "hset",
    "pexpire",
    "select",
)


def redis_acl_rules(namespace: str) -> list[str]:
    """The services' Redis user's rules (``ACL SETUSER <user> on >password <rules>``),
    without the password."""
    return [
        "resetkeys",
        f"~{namespace}:*",
        "resetchannels",
        f"&{namespace}:*",
        "-@all",
        *(f"+{command}" for command in REDIS_COMMANDS),
    ]


def redis_acl_setuser(user: str, password: str, namespace: str) -> list[Any]:
    """The ``ACL SETUSER`` command making (or resetting) the services' Redis user."""
    return ["ACL", "SETUSER", user, "reset", "on", f">{password}", *redis_acl_rules(namespace)]
