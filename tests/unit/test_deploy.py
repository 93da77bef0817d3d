"""The container stack stays valid (checked without a Docker engine)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_is_valid() -> None:
    result = subprocess.run(
        ["docker-compose", "config", "-q"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_compose_runs_every_service_the_stack_needs() -> None:
    result = subprocess.run(
        ["docker-compose", "config", "--services"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert set(result.stdout.split()) >= {
        "postgres",
        "rabbitmq",
        "redis",
        "schema",
        "gateway",
        "consumer",
        "relay",
        # observability
        "prometheus",
        "grafana",
        "loki",
        "alloy",
        "jaeger",
    }


def test_the_compose_observability_files_are_the_shipped_ones() -> None:
    """What Compose mounts exists, and Prometheus's jobs there are those the shipped
    rules and dashboard are written for (the same as `make run`'s)."""
    import json

    import yaml

    from flashclaim.devtools.prometheus import Targets, config

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    shipped = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    local = config(Targets([], [], [], []))
    jobs = [
        (j["job_name"], j.get("metrics_path"), j.get("params")) for j in shipped["scrape_configs"]
    ]
    assert jobs == [
        (j["job_name"], j.get("metrics_path"), j.get("params"))
        for j in local["scrape_configs"]  # type: ignore[index]
    ]
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/flashclaim.json").read_text())
    datasources = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/datasources.yml").read_text()
    )
    uids = {d["uid"] for d in datasources["datasources"]}
    assert {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]} <= uids


def test_compose_runs_a_supported_rabbitmq() -> None:
    """RabbitMQ 3.x is out of support; the compose stack runs 4.x."""
    result = subprocess.run(
        ["docker-compose", "config"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    images = [
        line.split(":", 1)[1].strip() for line in result.stdout.splitlines() if "image:" in line
    ]
    (rabbitmq,) = [i for i in images if i.startswith("rabbitmq:")]
    assert int(rabbitmq.split(":")[1].split(".")[0]) >= 4, rabbitmq
