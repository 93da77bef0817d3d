"""A Prometheus server for the local stack (Debian's package), scraping every service.

``make run`` starts one on a port of its own, so a new user sees live metrics without
Docker; the tests start one to check that every target is up and that the shipped alert
rules and dashboard evaluate. Its configuration is written from the stack's ports; the
rules are the shipped ``deploy/prometheus/alerts.yml``, the one file both this server
and the Compose one (``deploy/prometheus/prometheus.yml``) load. The jobs are named as in
the Compose configuration, so the rules and the dashboard work in both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flashclaim.devtools.devstack import Server, _bin, wait_for_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "flashclaim.json"
# RabbitMQ's plugin: per-queue figures (depth, consumers) from its detailed endpoint.
RABBITMQ_FAMILIES = ["queue_coarse_metrics", "queue_consumer_count"]


@dataclass(frozen=True)
class Targets:
    """Where each job's processes serve ``/metrics`` (``host:port``)."""

    gateway: list[str]
    consumer: list[str]
    relay: list[str]
    rabbitmq: list[str]


def config(targets: Targets, interval: str = "5s", rules: Path = RULES) -> dict[str, object]:
    """The configuration (as JSON, which Prometheus reads as YAML) for ``targets``."""

    def job(name: str, hosts: list[str], **extra: object) -> dict[str, object]:
        return {"job_name": name, "static_configs": [{"targets": hosts}], **extra}

    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rules)],
        "scrape_configs": [
            job("flashclaim-gateway", targets.gateway),
            job("flashclaim-consumer", targets.consumer),
            job("flashclaim-relay", targets.relay),
            job("rabbitmq", targets.rabbitmq),
            job(
                "rabbitmq-queues",
                targets.rabbitmq,
                metrics_path="/metrics/detailed",
                params={"family": RABBITMQ_FAMILIES},
            ),
        ],
    }


class Prometheus(Server):
    name = "prometheus"

    def __init__(self, root: Path, port: int, targets: Targets, interval: str = "5s") -> None:
        super().__init__(root, port, fast=False)
        self.targets = targets
        self.interval = interval

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.root / "prometheus.yml"

    def write_config(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(config(self.targets, self.interval), indent=2))
        return self.config_path

    def start(self) -> None:
        self.write_config()
        data = self.root / "prometheus-data"
        data.mkdir(parents=True, exist_ok=True)
        self._spawn(
            [
                _bin("/usr/bin/prometheus", "prometheus"),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=2d",
            ]
        )
        wait_for_port(self.port, 60, self.proc, self.name)
