"""A local PostgreSQL, RabbitMQ and Redis, each in its own folder and on its own ports.

``make run`` (profile ``run``) and the test suite (profile ``test``) use this, with
separate ports and folders, so tests never disturb a running stack. Servers whose URL
is given (``FLASHCLAIM_DATABASE_URL``, ``FLASHCLAIM_AMQP_URL``, ``FLASHCLAIM_REDIS_URL``)
are not started: the given one is used instead.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import glob
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg
import redis
from psycopg import sql

from flashclaim.core import logs
from flashclaim.core.privileges import broker_permissions, grant_services, redis_acl_setuser
from flashclaim.core.settings import Settings, environ, variable, without_password


class StackError(RuntimeError):
    """A local server could not be set up or started."""


@dataclass(frozen=True)
class Ports:
    postgres: int
    amqp: int
    management: int
    prometheus: int
    erlang_dist: int
    epmd: int
    redis: int
    # /metrics of the relay (this port) and of consumer i (this port + 1 + i); the
    # gateway serves its own on its HTTP port.
    metrics: int
    # The stack's own Prometheus server (`make run`, the tests).
    prometheus_server: int

    def metrics_targets(self, http_port: int, consumers: int) -> dict[str, list[str]]:
        def at(port: int) -> str:
            return f"127.0.0.1:{port}"

        return {
            "gateway": [at(http_port)],
            "consumer": [at(self.metrics + 1 + i) for i in range(consumers)],
            "relay": [at(self.metrics)],
            "rabbitmq": [at(self.prometheus)],
        }


# The test and bench servers listen below Linux's ephemeral port range (32768-60999),
# so that thousands of client connections (a load test) cannot be holding their port
# when they start.
PROFILES: dict[str, Ports] = {
    "run": Ports(55432, 55672, 55673, 55674, 55675, 55676, 56379, 55680, 55690),
    "test": Ports(25532, 25772, 25773, 25774, 25775, 25776, 26479, 25780, 25790),
    "bench": Ports(25632, 25872, 25873, 25874, 25875, 25876, 26579, 25880, 25890),
    # What the suite's own test of `make run` (flashclaim stack) starts.
    "stacktest": Ports(25732, 25972, 25973, 25974, 25975, 25976, 26679, 25980, 25990),
}


def wait_for_port(
    port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None, name: str = "server"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{name} exited with status {proc.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise StackError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def port_is_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first, then the
    parent's pid...); ``None`` if the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (with the pid, a process's identity: a pid
    reused by another process has another start time); ``None`` if it is gone."""
    fields = _stat(pid)
    return fields[19] if fields else None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (its children, theirs, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        fields = _stat(proc.name)
        if fields:
            children.setdefault(int(fields[1]), []).append(int(proc.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def leftovers(roots: Iterable[Path], ports: Iterable[int]) -> list[tuple[int, str]]:
    """Processes still running that belong to the stacks under ``roots`` or serve or
    use one of ``ports`` (their command line or working folder is under a root, or a
    FLASHCLAIM_* variable of their environment names a port): (pid, command line).
    This process and its ancestors are not counted."""
    marks = [str(r) for r in roots]
    port_marks = [f":{p}" for p in ports]
    mine = {os.getpid(), *_ancestors(os.getpid())}
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        pid = int(proc.name)
        if pid in mine:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        ours = [e.decode(errors="replace") for e in environ if e.startswith(b"FLASHCLAIM_")]
        # A PostgreSQL backend's command line is its title; its folder is the data's.
        if any(m in cmdline or cwd.startswith(m) for m in marks) or any(
            m + "/" in e or e.endswith(m) or m + "," in e for e in ours for m in port_marks
        ):
            found.append((pid, cmdline.strip()))
    return found


def _ancestors(pid: int) -> list[int]:
    found = []
    while pid > 1 and (fields := _stat(pid)):
        pid = int(fields[1])
        found.append(pid)
    return found


def record_pid(root: Path, name: str, pid: int) -> None:
    """Remember a process this stack started, so a later run can stop it if this one
    is killed before it could (SIGKILL, a closed terminal)."""
    (root / f"{name}.pid").write_text(f"{pid} {_start_time(pid) or ''}\n")


def stop_recorded(root: Path, grace: float = 30.0) -> list[str]:
    """Stop every process recorded under ``root`` that still runs (its whole process
    group: a server's helpers go with it); return the names of those stopped."""
    found: list[tuple[str, int]] = []
    for pidfile in sorted(root.glob("*.pid")):
        try:
            pid_text, started = [*pidfile.read_text().split(), ""][:2]
            pid = int(pid_text)
        except (OSError, ValueError):
            pidfile.unlink(missing_ok=True)
            continue
        if started and _start_time(pid) == started:
            found.append((pidfile.stem, pid))
        else:
            pidfile.unlink(missing_ok=True)
    # Services first (they drain while the servers are still there), then servers.
    servers = {"postgres", "rabbitmq", "redis"}
    for phase in ([f for f in found if f[0] not in servers], [f for f in found if f[0] in servers]):
        _stop_groups(phase, grace)
    for name, _ in found:
        (root / f"{name}.pid").unlink(missing_ok=True)
    return [name for name, _ in found]


def _stop_groups(procs: list[tuple[str, int]], grace: float) -> None:
    for name, pid in procs:
        # SIGINT is PostgreSQL's fast shutdown (SIGTERM would wait for its clients).
        sig = signal.SIGINT if name == "postgres" else signal.SIGTERM
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
    deadline = time.monotonic() + grace
    for _, pid in procs:
        while _start_time(pid) is not None and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.1)
        if _start_time(pid) is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


class Server:
    """A server process this stack owns; ``start``/``stop`` may be called repeatedly."""

    name = "server"

    def __init__(self, root: Path, port: int, fast: bool) -> None:
        self.root = root
        self.port = port
        self.fast = fast  # test profile: durability traded for speed where harmless
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.name}.log"

    def _spawn(
        self, argv: list[str], env: Mapping[str, str] | None = None, user: str | None = None
    ) -> None:
        if port_is_open(self.port):
            raise StackError(
                f"port {self.port} for {self.name} is taken: is another stack running? "
                f"(stop it, or set its FLASHCLAIM_*_URL to use it)"
            )
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            user=user,
            start_new_session=True,
        )
        record_pid(self.root, self.name, self.proc.pid)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            (self.root / f"{self.name}.pid").unlink(missing_ok=True)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL to the server and every process it started, as a crash would (a
        RabbitMQ node is a shell script's child: killing only the script is no crash)."""
        if self.proc is not None and self.proc.poll() is None:
            # PostgreSQL's backends each lead a process group of their own: found by
            # parentage, and killed too (even a stopped one, which would never notice
            # its postmaster gone).
            below = descendants(self.proc.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            for pid in below:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait()
        deadline = time.monotonic() + 10
        while port_is_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.stop()


def _bin(pattern: str, name: str) -> str:
    found = sorted(glob.glob(pattern))
    path = found[-1] if found else shutil.which(name)
    if path is None:
        raise StackError(f"{name} not found: run `make deps` (Debian packages) first")
    return path


class Postgres(Server):
    name = "postgres"

    def __init__(self, root: Path, port: int, fast: bool, commit_times: bool = False) -> None:
        """``commit_times``: track each transaction's commit time (for the tests, which
        check when a claim was committed against when its answers were given)."""
        super().__init__(root, port, fast)
        self.commit_times = commit_times
        self.bindir = Path(_bin("/usr/lib/postgresql/*/bin/postgres", "postgres")).parent
        # PostgreSQL refuses to run as root: run it as the 'postgres' account instead.
        self.user = "postgres" if os.geteuid() == 0 else None
        self.pgroot = self._writable_root(root / "postgres")
        self.data = self.pgroot / "data"

    @property
    def url(self) -> str:
        """The database's owner (migrations run as it)."""
        return f"postgresql://flashclaim@127.0.0.1:{self.port}/flashclaim"

    def service_url(self, account: str) -> str:
        """The services' role: its privileges granted once the schema is migrated
        (flashclaim/core/privileges.py); made here if missing (local: trust, no password)."""
        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (account,)).fetchone():
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(account)))
        grant_services(self.url, account)
        return f"postgresql://{account}@127.0.0.1:{self.port}/flashclaim"

    def _writable_root(self, preferred: Path) -> Path:
        if self.user is None:
            preferred.mkdir(parents=True, exist_ok=True)
            return preferred
        account = pwd.getpwnam(self.user)
        for candidate in (preferred, self._fallback(preferred)):
            candidate.mkdir(parents=True, exist_ok=True)
            os.chown(candidate, account.pw_uid, account.pw_gid)
            ok = (
                subprocess.run(
                    ["test", "-w", str(candidate)], user=self.user, check=False
                ).returncode
                == 0
            )
            if ok:
                return candidate
        raise StackError(f"no folder writable by the {self.user} account for PostgreSQL")

    @staticmethod
    def _fallback(preferred: Path) -> Path:
        # The project folder may sit under a folder the postgres account cannot enter
        # (a private temporary folder, say): keep the data in /var/tmp instead.
        digest = hashlib.sha1(str(preferred).encode()).hexdigest()[:10]
        return Path("/var/tmp") / f"flashclaim-pg-{digest}"

    def start(self) -> None:
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        settings = [
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=256MB",
            "-c",
            "listen_addresses=127.0.0.1",
        ]
        if self.fast:
            settings += ["-c", "fsync=off", "-c", "full_page_writes=off"]
        if self.commit_times:
            settings += ["-c", "track_commit_timestamp=on"]
        self._spawn(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.pgroot),
                *settings,
            ],
            user=self.user,
        )
        self.wait_ready()

    def _initdb(self) -> None:
        result = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            user=self.user,
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"initdb failed: {result.stderr.decode(errors='replace')}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.proc is not None
        wait_for_port(self.port, timeout, self.proc, self.name)
        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(admin, autocommit=True, connect_timeout=2) as conn:
                    if not conn.execute(
                        "SELECT 1 FROM pg_roles WHERE rolname='flashclaim'"
                    ).fetchone():
                        conn.execute("CREATE ROLE flashclaim LOGIN")
                    if not conn.execute(
                        "SELECT 1 FROM pg_database WHERE datname='flashclaim'"
                    ).fetchone():
                        conn.execute("CREATE DATABASE flashclaim OWNER flashclaim")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self, timeout: float = 30.0, sig: int = signal.SIGINT) -> None:
        # SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, checkpoint, exit.
        super().stop(timeout, sig)


class RabbitMQ(Server):
    name = "rabbitmq"
    PLUGINS = (
        "rabbitmq_management",
        "rabbitmq_prometheus",
        "rabbitmq_consistent_hash_exchange",
        "rabbitmq_shovel",
        "rabbitmq_shovel_management",
    )

    def __init__(self, root: Path, ports: Ports, fast: bool) -> None:
        super().__init__(root, ports.amqp, fast)
        self.ports = ports
        self.home = root / "rabbitmq"
        self.server_bin = _bin("/usr/lib/rabbitmq/bin/rabbitmq-server", "rabbitmq-server")
        self.management_url = f"http://127.0.0.1:{ports.management}/"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def node(self) -> str:
        """The Erlang node name (``rabbitmqctl -n``, cluster membership)."""
        return f"flashclaim{self.port}@localhost"

    def env(self) -> dict[str, str]:
        h = self.home
        return {
            "HOME": str(h),  # where the Erlang cookie lives
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.ports.erlang_dist),
            "ERL_EPMD_PORT": str(self.ports.epmd),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(h / "mnesia"),
            "RABBITMQ_LOG_BASE": str(h / "log"),
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(h / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(h / "rabbitmq.conf"),
            "RABBITMQ_PID_FILE": str(h / "rabbitmq.pid"),
        }

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "enabled_plugins").write_text("[" + ",".join(self.PLUGINS) + "].\n")
        (self.home / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            f"management.tcp.ip = 127.0.0.1\n"
            f"management.tcp.port = {self.ports.management}\n"
            f"prometheus.tcp.ip = 127.0.0.1\n"
            f"prometheus.tcp.port = {self.ports.prometheus}\n"
            "loopback_users.guest = true\n"
            # Queue views in the management API refresh every second, not every 5 s.
            + ("collect_statistics_interval = 1000\n" if self.fast else "")
        )
        self._spawn([self.server_bin], env=self.env())
        wait_for_port(self.port, 120, self.proc, self.name)

    def stop(self, timeout: float = 60.0, sig: int = signal.SIGTERM) -> None:
        super().stop(timeout, sig)

    def service_url(self, account: str, password: str, namespace: str) -> str:
        """The services' user, made or reset through the management API (as the
        administrator ``guest``): no tag, permissions on ``namespace`` only."""
        quoted = urllib.parse.quote(account, safe="")
        self._management("PUT", f"users/{quoted}", {"password": password, "tags": ""})
        self._management("PUT", f"permissions/%2F/{quoted}", broker_permissions(namespace))
        return f"amqp://{quoted}:{urllib.parse.quote(password, safe='')}@127.0.0.1:{self.port}/"

    def _management(self, method: str, path: str, body: object, timeout: float = 60) -> None:
        request = urllib.request.Request(
            f"{self.management_url}api/{path}",
            data=json.dumps(body).encode(),
            method=method,
            headers={
                "Content-Type": "application/json",
                "Authorization": "Basic " + base64.b64encode(b"guest:guest").decode(),
            },
        )
        deadline = time.monotonic() + timeout
        while True:  # the management API starts a moment after the AMQP port
            try:
                with urllib.request.urlopen(request, timeout=10):
                    return
            except (urllib.error.URLError, ConnectionError) as exc:
                if isinstance(exc, urllib.error.HTTPError) or time.monotonic() > deadline:
                    raise StackError(f"RabbitMQ management API: {method} {path}: {exc}") from exc
                time.sleep(0.5)

    def flush_metadata(self) -> None:
        """Write the broker's own metadata tables (Erlang DETS, saved every few seconds)
        to disk now. RabbitMQ 3.10's quorum queues (Ra 2.2) keep a queue's registration
        there: a node killed before it was saved brings a queue declared moments earlier
        back empty and without a leader (rabbitmq-server issues #10007, #10070). A crash
        test calls this first, so that it tests flashclaim, not that window."""
        self.ctl("eval", "[dets:sync(T) || T <- dets:all()].")

    def ctl(self, *args: str, tool: str = "rabbitmqctl", timeout: float = 60) -> str:
        """``rabbitmqctl`` (or another of the broker's tools) on this node; its output."""
        cookie = (self.home / ".erlang.cookie").read_text().strip()
        command = [_bin(f"/usr/lib/rabbitmq/bin/{tool}", tool), "--erlang-cookie", cookie]
        result = subprocess.run(
            [*command, "-n", self.node, *args],
            env={**os.environ, **self.env()},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"{tool} {' '.join(args)} on {self.node}: {result.stderr.strip()}")
        return result.stdout

    def shutdown_epmd(self) -> None:
        epmd = shutil.which("epmd") or next(
            iter(glob.glob("/usr/lib/erlang/erts-*/bin/epmd")), None
        )
        if epmd:
            subprocess.run(
                [epmd, "-port", str(self.ports.epmd), "-kill"], capture_output=True, check=False
            )


class Redis(Server):
    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        data = self.root / "redis"
        data.mkdir(parents=True, exist_ok=True)
        self._spawn(
            [
                _bin("/usr/bin/redis-server", "redis-server"),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(data),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                # Every key flashclaim writes has a TTL and can be lost (the inbox keeps
                # results): under memory pressure Redis evicts, it does not refuse.
                "--maxmemory",
                "256mb",
                "--maxmemory-policy",
                "volatile-lru",
            ]
        )
        wait_for_port(self.port, 30, self.proc, self.name)

    def service_url(self, account: str, password: str, namespace: str) -> str:
        """The services' ACL user, made or reset: flashclaim's commands, on keys and
        channels of ``namespace`` only."""
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)
        try:
            client.execute_command(*redis_acl_setuser(account, password, namespace))  # type: ignore[no-untyped-call]
        finally:
            client.close()
        user, secret = (urllib.parse.quote(v, safe="") for v in (account, password))
        return f"redis://{user}:{secret}@127.0.0.1:{self.port}/0"


RESERVED_PORTS = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")
# The services' account on each server of the local stack (loopback only, so a fixed
# password): what they may do is flashclaim/core/privileges.py's.
SERVICE_ACCOUNT = "flashclaim_app"
SERVICE_PASSWORD = "flashclaim_app"


def reserve_ports(ports: Ports) -> None:
    """Keep the kernel from handing the stack's ports to outgoing connections.

    The ports of ``make run`` (55432, 55672, 56379...) lie in Linux's ephemeral range:
    after a load test has opened thousands of connections, one of them can still hold
    such a port and the server cannot listen there. Where this process may (root), the
    ports are added to ``net.ipv4.ip_local_reserved_ports``; elsewhere nothing changes.
    """
    try:
        current = RESERVED_PORTS.read_text().strip()
        covered: list[tuple[int, int]] = []
        for item in filter(None, current.split(",")):
            low, _, high = item.partition("-")
            covered.append((int(low), int(high or low)))
        missing = [
            p for p in vars(ports).values() if not any(low <= p <= high for low, high in covered)
        ]
        if missing:
            RESERVED_PORTS.write_text(",".join([current, *map(str, missing)]).strip(","))
    except (OSError, ValueError):
        pass


# The servers' settings, and the variables naming a server to use instead of starting one.
SERVER_SETTINGS = {"postgres": "database_url", "rabbitmq": "amqp_url", "redis": "redis_url"}
ENV_URLS = {server: variable(name) for server, name in SERVER_SETTINGS.items()}
MANAGEMENT_URL = variable("amqp_management_url")


class Stack:
    """The three servers of one profile, minus those given by URL in ``environ``."""

    def __init__(
        self,
        profile: str,
        root: Path | None = None,
        environ: Mapping[str, str] | None = None,
        fresh: bool = False,
        durable: bool = False,
    ) -> None:
        """``durable``: the test profile's servers with the durable settings of `run`
        (PostgreSQL with fsync on), for the tests that crash them."""
        env = os.environ if environ is None else environ
        self._environ = dict(env)
        self.ports = PROFILES[profile]
        self.root = (root or Path.cwd() / ".stack") / profile
        if fresh and self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        fast = profile == "test" and not durable  # benchmarks keep `run`'s durable settings
        self.external = {k: env[v] for k, v in ENV_URLS.items() if env.get(v)}
        self.postgres = (
            None
            if "postgres" in self.external
            else Postgres(self.root, self.ports.postgres, fast, commit_times=profile == "test")
        )
        if fresh and self.postgres is not None and self.postgres.pgroot != self.root / "postgres":
            shutil.rmtree(self.postgres.data, ignore_errors=True)
        # RabbitMQ's `fast` is only fresher statistics (nothing of durability).
        self.rabbitmq = (
            None
            if "rabbitmq" in self.external
            else RabbitMQ(self.root, self.ports, profile == "test")
        )
        self.redis = None if "redis" in self.external else Redis(self.root, self.ports.redis, fast)

    @property
    def owned(self) -> list[Server]:
        return [s for s in (self.postgres, self.rabbitmq, self.redis) if s is not None]

    def urls(self) -> dict[str, str]:
        """The servers' settings (``FLASHCLAIM_*`` variables) for the services."""
        return environ(
            database_url=self.external.get("postgres") or self.postgres.url,  # type: ignore[union-attr]
            amqp_url=self.external.get("rabbitmq") or self.rabbitmq.url,  # type: ignore[union-attr]
            redis_url=self.external.get("redis") or self.redis.url,  # type: ignore[union-attr]
            amqp_management_url=(
                self.rabbitmq.management_url
                if self.rabbitmq is not None
                else self._environ.get(MANAGEMENT_URL, "")
            ),
        )

    def service_urls(self, namespace: str) -> dict[str, str]:
        """The services' settings: on each server this stack owns, an account of least
        privilege (flashclaim/core/privileges.py), made or reset here; a server given
        by URL is used as given. Call it once the schema is migrated. The broker's
        policies are then an administrator's to set (``apply_policies``): the services'
        user has no management API."""
        values: dict[str, object] = {}
        if self.postgres is not None:
            values["database_url"] = self.postgres.service_url(SERVICE_ACCOUNT)
        if self.rabbitmq is not None:
            values["amqp_url"] = self.rabbitmq.service_url(
                SERVICE_ACCOUNT, SERVICE_PASSWORD, namespace
            )
            values["amqp_management_url"] = ""
        if self.redis is not None:
            values["redis_url"] = self.redis.service_url(
                SERVICE_ACCOUNT, SERVICE_PASSWORD, namespace
            )
        return {**self.urls(), **environ(**values)}

    def start(self) -> None:
        reserve_ports(self.ports)
        # Servers and services an earlier run left behind (it was killed before it
        # could stop them) still hold the ports: they are ours, stop them first.
        left = stop_recorded(self.root)
        if left:
            print(
                f"flashclaim: stopped leftovers of an earlier run: {', '.join(left)}",
                file=sys.stderr,
                flush=True,
            )
        try:
            for server in self.owned:
                server.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for server in reversed(self.owned):
            with contextlib.suppress(Exception):
                server.stop()
        if self.rabbitmq is not None:
            self.rabbitmq.shutdown_epmd()


def run_foreground(profile: str, consumers: int = 1) -> int:
    """``make run``: the servers, the schema, then the gateway and consumers under
    supervisord (flashclaim/devtools/supervision.py), until Ctrl-C or SIGTERM."""
    from flashclaim.core.policies import apply_configured
    from flashclaim.core.schema_migrations import migrate
    from flashclaim.devtools import supervision
    from flashclaim.devtools.processes import StopRequest, terminate
    from flashclaim.devtools.prometheus import Prometheus, Targets

    stack = Stack(profile)
    stop = StopRequest()
    supervisor: subprocess.Popen[bytes] | None = None
    prometheus: Prometheus | None = None
    try:
        print(f"flashclaim: starting servers in {stack.root} ...", file=sys.stderr, flush=True)
        stack.start()
        # Two gateway processes share the port unless told otherwise (2-core machines).
        owner = Settings.from_env({**environ(gateway_workers=2), **os.environ, **stack.urls()})
        # As the owner and the administrator: the schema, then the broker's policies.
        applied = migrate(owner.database_url)
        print(
            "flashclaim: schema "
            + (f"migrated ({', '.join(applied)})" if applied else "up to date"),
            file=sys.stderr,
            flush=True,
        )
        asyncio.run(apply_configured(owner))
        # The services run with accounts of least privilege. Their lines reach this
        # terminal through supervisord: readable ones on a terminal, unless asked for.
        looks = {"log_format": "text"} if logs.as_text(owner.log_format) else {}
        env = {
            **environ(gateway_workers=2, **looks),
            **os.environ,
            **stack.service_urls(owner.namespace),
        }
        settings = Settings.from_env(env)
        targets = stack.ports.metrics_targets(settings.http_port, consumers)
        # The console's live view reads every service's figures, unless told otherwise.
        services = ("gateway", "consumer", "relay")
        pages = [f"http://{t}/metrics" for role in services for t in targets[role]]
        env = {**environ(console_metrics_urls=",".join(pages)), **env}
        grace = settings.shutdown_grace_seconds
        conf = supervision.config(stack.root, consumers, env, grace, stack.ports.metrics)
        supervisor = subprocess.Popen(supervision.command(conf), env=env, start_new_session=True)
        record_pid(stack.root, "supervisord", supervisor.pid)
        prometheus = Prometheus(stack.root, stack.ports.prometheus_server, Targets(**targets))
        prometheus.start()
        missing = _until_answering(settings.http_port, targets, stop)
        _print_summary(stack, settings, conf, prometheus.url, targets, missing)
        while not stop.requested:
            if supervisor.poll() is not None:
                print("flashclaim: supervisord exited; stopping", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        print("flashclaim: stopping ...", file=sys.stderr, flush=True)
        if supervisor is not None:
            # supervisord stops every service (SIGTERM, then its grace period).
            terminate([supervisor], 60)
        if prometheus is not None:
            prometheus.stop()
        stop_recorded(stack.root)
        stack.stop()
        print("flashclaim: stopped", file=sys.stderr, flush=True)


def stop_profile(profile: str) -> int:
    """``make stop``: stop whatever a ``flashclaim stack`` of ``profile`` left running."""
    root = Path.cwd() / ".stack" / profile
    stopped = stop_recorded(root) if root.exists() else []
    if stopped:
        Stack(profile).rabbitmq.shutdown_epmd()  # type: ignore[union-attr]
    print(f"flashclaim: stopped {', '.join(stopped) or 'nothing (none running)'}", file=sys.stderr)
    return 0


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


def _until_answering(
    http_port: int, targets: Mapping[str, list[str]], stop: Any, timeout: float = 60
) -> list[str]:
    """Wait until the gateway is ready and each consumer and relay answers its health
    check (a line every few seconds says which are still awaited); those that did not
    answer within ``timeout``."""
    checks = {"gateway": f"http://127.0.0.1:{http_port}/readyz"}
    for job in ("consumer", "relay"):
        for i, host in enumerate(targets.get(job, [])):
            checks[f"{job}-{i}" if job == "consumer" else job] = f"http://{host}/healthz"
    deadline = time.monotonic() + timeout
    told = time.monotonic()
    waiting = dict(checks)
    while waiting and time.monotonic() < deadline and not stop.requested:
        waiting = {name: url for name, url in waiting.items() if not _answers(url)}
        if waiting and time.monotonic() - told >= 5:
            print(f"flashclaim: waiting for {', '.join(waiting)} ...", file=sys.stderr)
            told = time.monotonic()
        if waiting:
            time.sleep(0.2)
    return sorted(waiting)


def _print_summary(
    stack: Stack,
    settings: Settings,
    conf: Path,
    prometheus: str,
    targets: Mapping[str, list[str]],
    missing: list[str],
) -> None:
    metrics = ", ".join(
        f"{job} {' '.join(hosts)}" for job, hosts in targets.items() if job != "rabbitmq"
    )
    state = (
        "flashclaim is running (Ctrl-C stops everything):"
        if not missing
        else f"flashclaim is up, but {', '.join(missing)} did not answer yet (see its lines"
        " above; Ctrl-C stops everything):"
    )
    lines = [
        "",
        state,
        f"  API              http://127.0.0.1:{settings.http_port}/api/coupons",
        f"  PostgreSQL       {without_password(settings.database_url)}",
        f"  RabbitMQ         {without_password(settings.amqp_url)}",
    ]
    if settings.admin_token.get_secret_value():
        lines.append(
            f"  console          http://{settings.admin_host}:{settings.admin_port}/console"
            "  (sign in with FLASHCLAIM_ADMIN_TOKEN)"
        )
    if stack.rabbitmq is not None:
        lines.append(f"  RabbitMQ UI      {stack.rabbitmq.management_url}  (guest / guest)")
    lines += [
        f"  Redis            {without_password(settings.redis_url)}",
        f"  events           exchange {settings.topology().events_exchange} (topic; bind a"
        " queue to coupon.#)",
        f"  Prometheus       {prometheus}  (alerts: {prometheus}/alerts)",
        f"  /metrics         {metrics}",
        f"  server logs      {stack.root}/*.log",
        f"  services         {Path(sys.executable).parent / 'supervisorctl'} -c {conf} status",
        "                   (a service that crashes is restarted)",
        "",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)
