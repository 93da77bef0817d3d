"""The gateway processes: gunicorn with aiohttp's worker, the aiohttp convention.

gunicorn's arbiter binds the port once and runs ``FLASHCLAIM_GATEWAY_WORKERS`` worker
processes on it (aiohttp's ``GunicornUVLoopWebWorker``, each with its own event loop,
its own reply channel and a listening socket of its own: see :class:`GatewayWorker`).
It restarts a worker that dies, and stops altogether, with exit status 3, when a worker
fails while booting (a bad setting would otherwise be retried forever). Shutdown
protocol, on SIGTERM or SIGINT to the arbiter:

1. every worker stops accepting connections;
2. in-flight requests finish within ``SHUTDOWN_GRACE_SECONDS`` (claims waiting for
   their result answer it, or 202 when their own wait runs out);
3. each worker closes Redis, the broker and the pool, in reverse order of opening;
   the arbiter kills whatever is still running ``SHUTDOWN_GRACE_SECONDS + 5`` seconds
   after the signal.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.worker import GunicornUVLoopWebWorker
from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from gunicorn.errors import HaltServer

from flashclaim.core import metrics, tracing
from flashclaim.core.http import CanonicalAccessLogger
from flashclaim.core.settings import Settings
from gateway.app import create_app
from gateway.idempotency import random_secret

log = logging.getLogger(__name__)

# A flash sale opens thousands of connections in the same instant: a short accept
# queue would drop SYNs and make clients wait seconds to retry them.
BACKLOG = 4096


def shared_secret() -> str:
    """A secret for the gateway processes started together when none is configured."""
    log.warning(
        "FLASHCLAIM_IDEMPOTENCY_SECRET is not set: Idempotency-Key retries are recognised"
        " only by the gateway processes started now, until they restart"
    )
    return random_secret()


def runner_factory(settings: Settings) -> Callable[[], Awaitable[web.AppRunner]]:
    """What each gunicorn worker calls (after the fork) to build its application."""

    async def make_runner() -> web.AppRunner:
        # In the worker, after the fork: the SDK's export thread does not survive one.
        tracing.configure("gateway")
        # The instance id was drawn (or given) once, for the arbiter: each worker is an
        # instance of its own (its reply channel above all: a worker subscribed to a
        # channel the others share would decode every reply of theirs too).
        worker = settings.replace(instance_id=f"{settings.instance_id}.{os.getpid()}")
        return web.AppRunner(
            create_app(worker),
            access_log_class=CanonicalAccessLogger,
            access_log=logging.getLogger("flashclaim.access"),
            # In-flight requests get the grace period once the worker stops listening.
            shutdown_timeout=settings.shutdown_grace_seconds,
        )

    return make_runner


class GatewayWorker(GunicornUVLoopWebWorker):
    """aiohttp's worker, listening on a socket of its own on the same port.

    With only the arbiter's shared socket, the worker whose event loop wakes first
    accepts a whole burst of connections (its loop accepts until the queue is empty)
    and the others idle: in a flash sale one process holds nearly every claim. Each
    worker's own socket joins the port's ``SO_REUSEPORT`` group, so the kernel spreads
    new connections evenly over the workers by their addresses. The shared socket is in
    the group too, so the first worker to start shuts it down for listening (which takes
    it out of the group): what landed there would otherwise go, a third of a burst with
    two workers, to whichever worker woke first, and a burst's peak memory is that of
    the worker holding the most connections.
    """

    def init_process(self) -> None:
        inherited: list[Any] = list(getattr(self, "sockets", []))  # gunicorn's listeners
        own: list[Any] = []
        for listener in inherited:
            family = listener.family
            if family not in _TCP:
                continue
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(listener.getsockname())
            sock.listen(BACKLOG)
            sock.setblocking(False)
            own.append(sock)
            _stop_listening(listener)
        self.sockets = [*own, *(s for s in inherited if s.family not in _TCP)]
        super().init_process()

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM: begin the shutdown protocol now. aiohttp's worker only notes the
        signal and notices it at its next one-second heartbeat; waking that wait saves
        up to a second of every stop (a rolling deploy, a scale-in)."""
        super().handle_exit(sig, frame)
        self._notify_waiter_done()


_TCP = (socket.AF_INET, socket.AF_INET6)


def _stop_listening(listener: Any) -> None:
    """Take the arbiter's socket out of the port's group: a listening socket shut down
    for reading stops listening, for every process that holds it (a worker started
    later finds it so already: nothing to do)."""
    with contextlib.suppress(OSError):  # ENOTCONN: no longer listening
        listener.shutdown(socket.SHUT_RD)


class _JsonLogs(glogging.Logger):  # type: ignore[misc]
    """gunicorn's own messages (worker started, exited...) as JSON lines, through the
    root handler the entry point configured; its access log is off (ours is used)."""

    def setup(self, cfg: Any) -> None:
        self.cfg = cfg
        self._access_log_enabled = False
        self.loglevel = self.LOG_LEVELS.get(cfg.loglevel.lower(), logging.INFO)
        self.error_log.setLevel(self.loglevel)
        self.error_log.propagate = True


def _worker_exited(server: Any, worker: Any) -> None:
    metrics.worker_exited(worker.pid)


class GatewayServer(BaseApplication):  # type: ignore[misc]
    """gunicorn configured from :class:`Settings` (no gunicorn config file is read)."""

    def __init__(self, settings: Settings) -> None:
        # Every worker must derive the same request id from an Idempotency-Key: the
        # secret is settled here, before the workers are forked.
        if not settings.idempotency_secret.get_secret_value():
            settings = settings.replace(idempotency_secret=shared_secret())
        self._settings = settings
        super().__init__()

    def load_config(self) -> None:
        s = self._settings
        options: dict[str, Any] = {
            "bind": [f"{s.http_host}:{s.http_port}"],
            "workers": s.gateway_workers,
            "worker_class": GatewayWorker,
            # Each worker adds a socket of its own to the port's SO_REUSEPORT group.
            "reuse_port": True,
            "backlog": BACKLOG,
            "graceful_timeout": math.ceil(s.shutdown_grace_seconds) + 5,
            # The arbiter's heartbeat: a worker stuck this long is replaced.
            "timeout": 30,
            "keepalive": 75,
            "proc_name": "flashclaim-gateway",
            # Logs: ours (JSON, configured by the entry point); gunicorn's own lines go
            # through the same root handler, its access log is replaced by ours.
            "logger_class": _JsonLogs,
            "accesslog": None,
            "loglevel": s.log_level.lower(),
            "capture_output": False,
            # A worker that exited (or was replaced) no longer counts in live gauges.
            "child_exit": _worker_exited,
        }
        # gunicorn 27's control socket sits at one path per user: several gateways on a
        # machine would take it from each other. Nothing here uses it.
        if "control_socket_disable" in self.cfg.settings:
            options["control_socket_disable"] = True
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Callable[[], Awaitable[web.AppRunner]]:
        return runner_factory(self._settings)


def serve(settings: Settings) -> int:
    """Run the gateway until SIGTERM or SIGINT; the exit status of gunicorn's arbiter."""
    given = os.environ.get(metrics.MULTIPROC_VARIABLE)
    if settings.metrics_enabled:
        # Before the fork: each worker counts in a file of its own in this folder, and
        # /metrics sums them (flashclaim/core/metrics.py).
        folder = metrics.use_multiprocess(given)
    try:
        GatewayServer(settings).run()
    except SystemExit as exc:
        return int(exc.code or 0)
    except HaltServer as exc:
        # A second worker failing to boot while the arbiter halts for the first: gunicorn
        # raises the halt again from its stop and lets it out (exit 1, a traceback).
        return int(exc.exit_status)
    finally:
        if settings.metrics_enabled and not given:
            shutil.rmtree(folder, ignore_errors=True)
    return 0
