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
    }


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
