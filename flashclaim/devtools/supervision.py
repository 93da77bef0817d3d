"""The stack's services under supervisord: restarted when they crash, stopped in order.

``make run`` starts the servers itself (flashclaim/devtools/devstack.py), then hands the
services to supervisord (the long-standing process manager of Python deployments;
honcho stops everything when one process exits, which is the behaviour being avoided,
and circus brings ZeroMQ for no gain here):

- a service that exits is started again and the event is logged; one that keeps
  failing within ``startsecs`` of its start is retried with a growing delay
  (1 s, 2 s, 3 s...) ``startretries`` times, then left FATAL with its log, while the
  rest of the stack keeps serving;
- only a stop of the stack (Ctrl-C, SIGTERM) stops the services: supervisord sends each
  SIGTERM and waits for its shutdown grace period before SIGKILL.

The configuration is generated into the stack's folder; ``supervisorctl -c
.stack/run/supervisord.conf status`` shows the services.
"""

from __future__ import annotations

import getpass
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path

from flashclaim.core.settings import environ, variable
from flashclaim.devtools.processes import service_command

# A service that ran this long counts as started: a crash later is restarted at once.
START_SECONDS = 3
START_RETRIES = 5


def programs(
    consumers: int, env: Mapping[str, str], metrics_port: int = 0
) -> dict[str, dict[str, str]]:
    """Program name -> extra environment, for every service of the stack; the relay
    serves /metrics on ``metrics_port`` and consumer i on ``metrics_port + 1 + i``
    (none if 0)."""

    def port(offset: int) -> int:
        return metrics_port + offset if metrics_port else 0

    progs: dict[str, dict[str, str]] = {
        "gateway": {},
        "relay": environ(instance_id="relay-0", metrics_port=port(0)),
    }
    for i in range(consumers):
        # The consumers share the partitions (each one the stand-by of the others').
        progs[f"consumer-{i}"] = environ(
            consumer_count=consumers,
            consumer_index=i,
            instance_id=f"consumer-{i}",
            metrics_port=port(1 + i),
        )
    if env.get(variable("admin_token")):
        progs["admin"] = {}
    return progs


def config(
    root: Path, consumers: int, env: Mapping[str, str], grace: float, metrics_port: int = 0
) -> Path:
    """Write supervisord's configuration for the stack in ``root``; return its path."""
    state = root / "supervisord"
    state.mkdir(parents=True, exist_ok=True)
    # supervisorctl's credentials on the socket (supervisord warns of a socket without);
    # the socket is the stack's user's alone anyway (mode 0700).
    secret = secrets.token_hex(16)
    lines = [
        "[supervisord]",
        # In the foreground, supervisord also writes its log to the terminal: its own
        # events (started, exited, restarting) appear there once, and in this file.
        "nodaemon=true",
        f"logfile={state / 'supervisord.log'}",
        "logfile_maxbytes=10MB",
        "loglevel=info",
        f"pidfile={state / 'supervisord.pid'}",
        f"childlogdir={state}",
        # Named, so that supervisord does not warn that it kept root's privileges.
        f"user={getpass.getuser()}",
        "",
        "[unix_http_server]",
        f"file={state / 'supervisor.sock'}",
        "chmod=0700",
        "username=flashclaim",
        f"password={secret}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{state / 'supervisor.sock'}",
        "username=flashclaim",
        f"password={secret}",
    ]
    role = {"gateway": "gateway", "admin": "admin", "relay": "relay"}
    for name, extra in programs(consumers, env, metrics_port).items():
        command = " ".join(service_command(role.get(name, "consumer")))
        lines += [
            "",
            f"[program:{name}]",
            f"command={command}",
            "autostart=true",
            "autorestart=true",
            f"startsecs={START_SECONDS}",
            f"startretries={START_RETRIES}",
            "stopsignal=TERM",
            f"stopwaitsecs={int(grace) + 15}",
            # SIGKILL, if it comes to that, takes a gateway's worker processes too.
            "killasgroup=true",
            "redirect_stderr=true",
            "stdout_logfile=/dev/stdout",
            "stdout_logfile_maxbytes=0",
        ]
        if extra:
            lines.append("environment=" + ",".join(f'{k}="{v}"' for k, v in extra.items()))
    path = root / "supervisord.conf"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)  # it holds the socket's password
    return path


def command(conf: Path) -> list[str]:
    return [sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)]


def ctl(conf: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), *args]
