"""``make generate``: every file derived from the code, written from its one source.

==========================================  =============================================
file                                        source
==========================================  =============================================
``schema.sql``                              the migrations, applied to a scratch
                                            PostgreSQL and dumped (devtools/schemafile.py)
``deploy/rabbitmq/definitions.json``        the topology and its policies
                                            (core/topology.py, policies.py), the
                                            services' permissions (core/privileges.py)
                                            and the Compose demo's two accounts
``deploy/k8s/base/topology.yaml``           the same, as the Messaging Topology
                                            Operator's resources (devtools/k8s.py)
``deploy/k8s/base/observability.yaml``      the alert rules and the dashboard
==========================================  =============================================

``python -m flashclaim.devtools.generate`` writes them; with ``--check`` it writes
nothing and exits 1 naming the files that differ from what it would write (the tests run
that check, so no derived file can fall behind its source).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flashclaim.core.policies import definitions
from flashclaim.core.privileges import broker_permissions
from flashclaim.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

# The Compose demo's broker accounts (docker-compose.yml, docs/DEPLOYMENT.md, "Docker Compose"): an
# administrator for people, and the services' account of least privilege. Their
# passwords are the demo's, written in docker-compose.yml beside them.
COMPOSE_ACCOUNTS = {"admin": ("admin", ["administrator"]), "flashclaim_app": ("flashclaim_app", [])}
DEFINITIONS = "deploy/rabbitmq/definitions.json"


def _rabbit_hash(password: str, salt: bytes) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt +
    password)), with a 4-byte salt."""
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _kept_hash(password: str, shipped: str | None) -> str:
    """The shipped hash while it is still this password's (a new salt would change the
    file at every run), else a new one."""
    if shipped:
        salt = base64.b64decode(shipped)[:4]
        if _rabbit_hash(password, salt) == shipped:
            return shipped
    return _rabbit_hash(password, os.urandom(4))


def compose_definitions() -> str:
    settings = Settings.checked({})
    path = ROOT / DEFINITIONS
    shipped = json.loads(path.read_text()) if path.exists() else {}
    hashes = {u["name"]: u.get("password_hash") for u in shipped.get("users", [])}
    users = [
        {
            "name": name,
            "password_hash": _kept_hash(password, hashes.get(name)),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": tags,
        }
        for name, (password, tags) in COMPOSE_ACCOUNTS.items()
    ]
    permissions = [
        {"user": "admin", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"},
        {"user": "flashclaim_app", "vhost": "/", **broker_permissions(settings.namespace)},
    ]
    document: dict[str, Any] = {"users": users, "permissions": permissions}
    document |= definitions(settings.topology(), broker_major_version=4)
    return json.dumps(document, indent=2) + "\n"


def k8s_topology() -> str:
    from flashclaim.devtools import k8s

    return k8s.render()


def k8s_observability() -> str:
    from flashclaim.devtools import k8s

    return k8s.render_observability()


def schema_sql() -> str:
    """The migrations applied to an empty database of a scratch PostgreSQL, dumped."""
    from flashclaim.core.schema_migrations import migrate
    from flashclaim.devtools import schemafile
    from flashclaim.devtools.devstack import Postgres

    with tempfile.TemporaryDirectory(prefix="flashclaim-schema-") as folder:
        server = Postgres(Path(folder), _free_port(), fast=True)
        server.start()
        try:
            migrate(server.url)
            return schemafile.render(schemafile.pg_dump(server.url, server.bindir))
        finally:
            server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Without a server first: schema.sql starts one, so it is last.
GENERATED: dict[str, Callable[[], str]] = {
    DEFINITIONS: compose_definitions,
    "deploy/k8s/base/topology.yaml": k8s_topology,
    "deploy/k8s/base/observability.yaml": k8s_observability,
    "schema.sql": schema_sql,
}


def stale(only: Callable[[str], bool] = lambda path: True) -> list[str]:
    """The derived files that differ from what their sources give now."""
    return [
        path
        for path, render in GENERATED.items()
        if only(path) and (ROOT / path).read_text() != render()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make generate", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    if args.check:
        behind = stale()
        for path in behind:
            print(f"{path} is out of date: run `make generate`", file=sys.stderr)
        return 1 if behind else 0
    for path, render in GENERATED.items():
        target = ROOT / path
        text = render()
        if target.exists() and target.read_text() == text:
            print(f"{path}: up to date", file=sys.stderr)
            continue
        target.write_text(text)
        print(f"{path}: written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
