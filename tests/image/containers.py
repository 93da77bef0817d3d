"""flashclaim's services as containers of the built image, run the way docker-compose.yml
declares them, with podman (no Docker engine here).

What is taken from the Compose file, as `docker-compose config` resolves it: each
service built from the project (schema, consumer, relay, gateway), its image, command,
environment, user, restart policy, stop grace period, dependencies and health check (the
image's ``HEALTHCHECK`` with the service's overrides). What differs, because the
containers share the host's network instead of a network of their own:

- the servers' host names in the environment (``postgres:5432``, ``rabbitmq:5672``...)
  become the addresses of the servers the test command started (and the database is one
  made for the run);
- each container gets free ports for what it listens on (the gateway's HTTP port, a
  consumer's or relay's metrics port), where Compose would give each its own network.

podman cannot run health checks on a timer without systemd, so :meth:`Container.probe`
runs the declared check (``podman healthcheck run``), as the engine's timer would, and
podman records the result and the status (starting, healthy, unhealthy) itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
PODMAN = ("podman", "--storage-driver=vfs", "--runtime", "runc", "--cgroup-manager=cgroupfs")
# At or under this machine's hard limits (a container fails to start above them).
LIMITS = ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")
# Where `make image` puts the images (FLASHCLAIM_IMAGE and FLASHCLAIM_EDGE_IMAGE name
# others): flashclaim's, and the edge's (deploy/edge/Dockerfile).
IMAGE = os.environ.get("FLASHCLAIM_IMAGE", "localhost/flashclaim:latest")
EDGE_IMAGE = os.environ.get("FLASHCLAIM_EDGE_IMAGE", "localhost/flashclaim-edge:latest")


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: {result.returncode}\n{result.stderr}")
    return result


def seconds(duration: str | int | float) -> float:
    """A Compose duration (``20s``, ``1m30s``, ``500ms``) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


@dataclass(frozen=True)
class HealthCheck:
    test: list[str]
    interval: float
    timeout: float
    start_period: float
    retries: int

    def run_options(self) -> list[str]:
        kind, *words = self.test
        command = json.dumps(words) if kind == "CMD" else " ".join(words)
        return [
            f"--health-cmd={command}",
            f"--health-interval={self.interval:g}s",
            f"--health-timeout={self.timeout:g}s",
            f"--health-start-period={self.start_period:g}s",
            f"--health-retries={self.retries}",
        ]


@dataclass(frozen=True)
class Declared:
    """One service of docker-compose.yml that runs the project's image."""

    service: str
    image: str  # as Compose names it
    built: str  # the image `make image` built for it
    command: list[str]
    environment: dict[str, str]
    user: str | None
    restart: str
    stop_grace: float
    depends_on: dict[str, str]  # service -> condition
    healthcheck: HealthCheck | None
    volumes: list[str]  # Compose's short form: "source:target[:mode]"


def _image_healthcheck(image: str) -> dict[str, Any]:
    (inspected,) = json.loads(podman("image", "inspect", image).stdout)
    check = inspected.get("Healthcheck") or {}
    return {
        "test": check.get("Test"),
        "interval": check.get("Interval", 30e9) / 1e9,
        "timeout": check.get("Timeout", 30e9) / 1e9,
        "start_period": check.get("StartPeriod", 0) / 1e9,
        "retries": check.get("Retries", 3),
    }


def declared_services(image: str = IMAGE) -> dict[str, Declared]:
    """The Compose file's services built from this project, resolved by docker-compose
    (anchors, defaults) and merged with the image's own health check."""
    resolved = subprocess.run(
        ["docker-compose", "config"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    document = yaml.safe_load(resolved.stdout)
    services: dict[str, Declared] = {}
    health: dict[str, dict[str, Any]] = {}  # each built image's, inspected once
    for name, service in document["services"].items():
        if "build" not in service:
            continue
        built = EDGE_IMAGE if images_match(service["image"], EDGE_IMAGE) else image
        if built not in health:
            health[built] = _image_healthcheck(built)
        image_health = health[built]
        override = service.get("healthcheck", {})
        check: HealthCheck | None = None
        if not override.get("disable"):
            merged = {**image_health}
            for key in ("interval", "timeout", "start_period"):
                if key in override:
                    merged[key] = seconds(override[key])
            merged["retries"] = override.get("retries", merged["retries"])
            merged["test"] = override.get("test", merged["test"])
            if merged["test"]:
                check = HealthCheck(**merged)
        services[name] = Declared(
            service=name,
            image=service["image"],
            built=built,
            command=list(service.get("command", [])),
            environment={k: str(v) for k, v in (service.get("environment") or {}).items()},
            user=service.get("user"),
            restart=service.get("restart", "no"),
            stop_grace=seconds(service.get("stop_grace_period", "10s")),
            depends_on={
                k: v.get("condition", "service_started")
                for k, v in (service.get("depends_on") or {}).items()
            },
            healthcheck=check,
            volumes=[str(v) for v in service.get("volumes", [])],
        )
    return services


def rewrite(environment: Mapping[str, str], addresses: Mapping[str, str]) -> dict[str, str]:
    """``environment`` with each ``host:port`` of ``addresses`` replaced by its value
    (``postgres:5432/flashclaim`` -> ``127.0.0.1:25532/run_db``, say)."""
    out = {}
    for key, value in environment.items():
        for compose_address, here in addresses.items():
            value = value.replace(compose_address, here)
        out[key] = value
    return out


@dataclass
class Container:
    name: str
    declared: Declared

    def inspect(self) -> dict[str, Any]:
        (state,) = json.loads(podman("container", "inspect", self.name).stdout)
        return dict(state)

    def health(self) -> str:
        state = self.inspect()["State"]
        return str((state.get("Health") or state.get("Healthcheck") or {}).get("Status", ""))

    def probe(self) -> bool:
        """One run of the declared health check, recorded by podman."""
        return podman("healthcheck", "run", self.name, check=False, timeout=60).returncode == 0

    def until_healthy(self) -> float:
        """Probe at the declared interval until podman calls it healthy; the seconds it
        took. Fails if it exits or is still not healthy when the start period and every
        retry are over."""
        check = self.declared.healthcheck
        assert check is not None, self.name
        started = time.monotonic()
        budget = check.start_period + check.interval * (check.retries + 1) + 30
        while time.monotonic() - started < budget:
            state = self.inspect()
            assert state["State"]["Running"], f"{self.name} exited:\n{self.logs()[-3000:]}"
            # Restarted by its restart policy: it crashed (a loop, under Compose).
            restarts = state.get("RestartCount", 0)
            assert restarts == 0, f"{self.name} restarted {restarts}x:\n{self.logs()[-3000:]}"
            self.probe()
            status = self.health()
            if status == "healthy":
                return time.monotonic() - started
            assert status != "unhealthy", f"{self.name} unhealthy:\n{self.logs()[-3000:]}"
            time.sleep(min(check.interval, 1.0))
        raise AssertionError(f"{self.name} not healthy after {budget:.0f} s")

    def users(self) -> set[str]:
        """The user ids of every process in the container (gunicorn's workers too)."""
        rows = podman("top", self.name, "user", "huser", "args").stdout.splitlines()[1:]
        return {row.split()[0] for row in rows if row.strip()}

    def stop(self, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """``docker stop``: SIGTERM, then SIGKILL after the declared grace period."""
        grace = self.declared.stop_grace if timeout is None else timeout
        return podman("stop", "-t", f"{grace:g}", self.name, timeout=grace + 60)

    def start(self) -> None:
        podman("start", self.name)

    def exit_code(self) -> int:
        return int(self.inspect()["State"]["ExitCode"])

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


class Deployment:
    """The declared services, started as containers on the host's network."""

    def __init__(
        self,
        declared: Mapping[str, Declared],
        addresses: Mapping[str, str],
        image: str = IMAGE,
    ) -> None:
        self.declared = declared
        self.addresses = addresses
        self.image = image
        self.tag = uuid.uuid4().hex[:6]
        self.containers: list[Container] = []

    def environment(self, service: str, ports: Mapping[str, int]) -> dict[str, str]:
        env = rewrite(self.declared[service].environment, self.addresses)
        env.update({k: str(v) for k, v in ports.items()})
        return env

    def _options(
        self, service: str, ports: Mapping[str, int], name: str, once: bool = False
    ) -> list[str]:
        """`podman run`'s options for ``service``; ``once``: removed when it exits,
        not restarted (a one-shot run)."""
        declared = self.declared[service]
        restart = "--rm" if once else f"--restart={declared.restart}"
        options = ["--name", name, "--network=host", *LIMITS, restart]
        if declared.user:
            options.append(f"--user={declared.user}")
        if declared.healthcheck:
            options += declared.healthcheck.run_options()
        for key, value in self.environment(service, ports).items():
            options += ["--env", f"{key}={value}"]
        for volume in declared.volumes:
            options += ["--volume", self.volume(volume)]
        return options

    def volume(self, declared: str) -> str:
        """A Compose volume as podman's: a named one is this deployment's own podman
        volume (made empty at first use, filled from the image's folder as Docker does);
        a host path is mounted as it is."""
        source, _, rest = declared.partition(":")
        if source.startswith(("/", ".")):
            return declared
        return f"{self.volume_name(source)}:{rest}"

    def volume_name(self, source: str) -> str:
        return f"fc-{self.tag}-{source}"

    def volume_path(self, source: str) -> Path:
        """Where a named volume's files are on this machine."""
        inspected = podman("volume", "inspect", self.volume_name(source)).stdout
        return Path(json.loads(inspected)[0]["Mountpoint"])

    def run_once(
        self, service: str, *command: str, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """A one-shot service (``schema``) or a command of the image, to its exit."""
        name = f"fc-{self.tag}-{service}-once-{uuid.uuid4().hex[:4]}"
        options = self._options(service, {}, name, once=True)
        args = list(command) or self.declared[service].command
        return podman("run", *options, self.image, *args, timeout=timeout, check=False)

    def start(self, service: str, ports: Mapping[str, int], suffix: str = "") -> Container:
        name = f"fc-{self.tag}-{service}{suffix}"
        declared = self.declared[service]
        podman(
            "run",
            "--detach",
            *self._options(service, ports, name),
            declared.built,
            *declared.command,
        )
        container = Container(name, declared)
        self.containers.append(container)
        return container

    def remove_all(self) -> None:
        for container in self.containers:
            container.remove()
        names = podman("volume", "ls", "--format", "{{.Name}}", check=False).stdout.split()
        for name in names:
            if name.startswith(f"fc-{self.tag}-"):
                podman("volume", "rm", "-f", name, check=False)


def images_match(compose_image: str, built: str = IMAGE) -> bool:
    """Compose's ``flashclaim:latest`` is what podman names ``localhost/flashclaim:latest``;
    FLASHCLAIM_IMAGE may name another tag of the same repository."""
    repository = compose_image.rsplit(":", 1)[0]
    return built.rsplit(":", 1)[0] in (repository, f"localhost/{repository}")
