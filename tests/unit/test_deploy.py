"""The container stack stays valid (checked without a Docker engine)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from flashclaim.core.settings import Settings
from tests.acceptance.conftest import free_port

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


# -- the image ----------------------------------------------------------------------


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "deploy/Dockerfile"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_installs_exactly_the_production_lock() -> None:
    """The recipe, read: every `pip install` is a hash-checked lock without resolving
    anything (`--no-deps`): the production lock into the service's environment, the
    build backend's into a build environment of its own; the project's wheel is built
    with that backend (no build isolation: nothing unpinned is fetched) and installed
    without dependencies. The final stage copies the service's environment only and
    runs as a non-root user, with a health check. (`make test-image` checks the built
    image's packages against the lock.)"""
    text = (ROOT / "deploy/Dockerfile").read_text()
    runs = [line for line in re.split(r"(?<!\\)\n", text) if line.startswith(("RUN", "    &&"))]
    installs = [m.group(0) for r in runs for m in re.finditer(r"pip (?:install|wheel)[^&|]*", r)]
    assert len(installs) == 4, installs
    locks = {}
    for install in installs:
        words = [w for w in install.split() if w != "\\"]
        assert "--no-deps" in words, install
        if "-r" in words:
            assert "--require-hashes" in words, install
            locks[words[words.index("-r") + 1]] = install
        elif words[1] == "wheel":
            assert "--no-build-isolation" in words and words[-1] == ".", install
        else:
            assert words[-1] == "/src/dist/flashclaim-*.whl", install
    assert set(locks) == {"requirements.lock", "requirements-build.lock"}
    assert "/opt/flashclaim/bin/pip" in runs[1] and "/opt/build/bin/pip" in runs[1]
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2, "a build stage and a runtime stage"
    runtime = stages[-1]
    assert "pip install" not in runtime and "apt-get" not in runtime
    assert "COPY --from=build /opt/flashclaim /opt/flashclaim" in runtime
    assert re.search(r"^USER (?!0|root)", runtime, re.M)
    assert "HEALTHCHECK" in runtime and 'ENTRYPOINT ["flashclaim"]' in runtime
    # The metrics folder is the gateway's alone: set for every process, the consumer
    # and the relay refuse to start (flashclaim/core/metrics.refuse_multiprocess).
    assert "PROMETHEUS_MULTIPROC_DIR" not in text.replace("# No PROMETHEUS_MULTIPROC_DIR", "")


def test_the_build_backend_lock_is_pyproject_s() -> None:
    """The image builds the wheel with requirements-build.lock's backend: it satisfies
    pyproject.toml's [build-system], and is the development lock's version."""
    import tomllib

    from packaging.requirements import Requirement

    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    pins = dict(
        re.findall(
            r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements-build.lock").read_text(), re.M
        )
    )
    dev = dict(
        re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements-dev.lock").read_text(), re.M)
    )
    for text in build["requires"]:
        requirement = Requirement(text)
        assert requirement.name in pins, requirement
        assert requirement.specifier.contains(pins[requirement.name]), (requirement, pins)
        assert dev.get(requirement.name) == pins[requirement.name]


def test_the_image_health_check_follows_the_service_pid_1_runs(tmp_path: Path) -> None:
    from flashclaim import healthcheck

    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"/opt/flashclaim/bin/python\0/opt/flashclaim/bin/flashclaim\0relay\0")
    assert healthcheck.role(cmdline) == "relay"
    cmdline.write_bytes(b"flashclaim\0schema\0apply\0")
    assert healthcheck.role(cmdline) is None
    settings = Settings().replace(http_port=free_port(), metrics_port=free_port())
    assert not healthcheck.check("gateway", settings)
    assert not healthcheck.check("consumer", settings)
    assert healthcheck.check("consumer", settings.replace(metrics_port=0))
    assert healthcheck.check(None, settings)


# -- Kubernetes -----------------------------------------------------------------------

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"
CORE_KINDS = {
    "ConfigMap",
    "Deployment",
    "HorizontalPodAutoscaler",
    "Job",
    "Namespace",
    "PodDisruptionBudget",
    "Service",
    "StatefulSet",
}
# The operators' resources: apiVersion and the fields each must have (dotted paths).
CUSTOM = {
    "RabbitmqCluster": ("rabbitmq.com/v1beta1", ["spec.replicas"]),
    "Exchange": (
        "rabbitmq.com/v1beta1",
        ["spec.name", "spec.type", "spec.rabbitmqClusterReference.name"],
    ),
    "Queue": (
        "rabbitmq.com/v1beta1",
        ["spec.name", "spec.type", "spec.rabbitmqClusterReference.name"],
    ),
    "Binding": (
        "rabbitmq.com/v1beta1",
        ["spec.source", "spec.destination", "spec.rabbitmqClusterReference.name"],
    ),
    "Policy": (
        "rabbitmq.com/v1beta1",
        ["spec.name", "spec.pattern", "spec.definition", "spec.rabbitmqClusterReference.name"],
    ),
    "Cluster": (
        "postgresql.cnpg.io/v1",
        ["spec.instances", "spec.storage.size", "spec.minSyncReplicas"],
    ),
    "ScheduledBackup": ("postgresql.cnpg.io/v1", ["spec.schedule", "spec.cluster.name"]),
    "RedisReplication": (
        "redis.redis.opstreelabs.in/v1beta2",
        ["spec.clusterSize", "spec.kubernetesConfig.image"],
    ),
    "RedisSentinel": (
        "redis.redis.opstreelabs.in/v1beta2",
        ["spec.clusterSize", "spec.redisSentinelConfig.redisReplicationName"],
    ),
    "ServiceMonitor": ("monitoring.coreos.com/v1", ["spec.selector", "spec.endpoints"]),
}
# Secrets the manifests read: made by an operator, or by the deployer (README).
SECRETS = {
    "flashclaim-db-app",
    "flashclaim-mq-default-user",
    "flashclaim-secrets",
    "flashclaim-backup-s3",
}


def rendered(path: Path = K8S / "overlays" / "example") -> list[dict[str, Any]]:
    import yaml

    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not installed: `make deps` installs it"
    result = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def secret_names(node: Any) -> set[str]:
    """Every Secret a manifest reads (``secretKeyRef``, and the CNPG backup's refs)."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("secretKeyRef", "accessKeyId", "secretAccessKey") and "name" in value:
                found.add(value["name"])
            found |= secret_names(value)
    elif isinstance(node, list):
        for item in node:
            found |= secret_names(item)
    return found


def field(doc: dict[str, Any], dotted: str) -> Any:
    value: Any = doc
    for key in dotted.split("."):
        value = value[key]
    return value


def test_the_kubernetes_manifests_render_and_validate() -> None:
    import kubernetes_validate

    docs = rendered()
    kinds = {d["kind"] for d in docs}
    assert kinds >= CORE_KINDS and set(CUSTOM) <= kinds, kinds
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"].get("namespace", "flashclaim-prod") == "flashclaim-prod", where
        if doc["kind"] in CORE_KINDS:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{where}: {exc.message}") from None
        else:
            assert doc["kind"] in CUSTOM, where
            api, required = CUSTOM[doc["kind"]]
            assert doc["apiVersion"] == api, where
            for path in required:
                field(doc, path)  # KeyError names what is missing
    # A secret is referenced, never stored.
    assert "Secret" not in kinds
    assert secret_names(docs) == SECRETS
    assert "password" not in {k.lower() for d in docs for k in d.get("data", {})}


def test_the_kubernetes_workloads_keep_the_services_promises() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in rendered()}
    config = docs[("ConfigMap", "flashclaim-config")]["data"]
    grace = float(config["FLASHCLAIM_SHUTDOWN_GRACE_SECONDS"])
    consumers = docs[("StatefulSet", "flashclaim-consumer")]
    pod = consumers["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    # Consumer i of CONSUMER_COUNT: the ordinal, and as many as the replicas.
    assert int(env["FLASHCLAIM_CONSUMER_COUNT"]["value"]) == consumers["spec"]["replicas"]
    assert "pod-index" in env["FLASHCLAIM_CONSUMER_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    for kind, name in (
        ("StatefulSet", "flashclaim-consumer"),
        ("Deployment", "flashclaim-gateway"),
    ):
        spec = docs[(kind, name)]["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > grace + 5, name
    gateway = docs[("Deployment", "flashclaim-gateway")]["spec"]["template"]["spec"]
    probes = gateway["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert ("PodDisruptionBudget", "flashclaim-gateway") in docs
    assert ("HorizontalPodAutoscaler", "flashclaim-gateway") in docs
    # Replicated servers: three broker nodes, a synchronous standby, Sentinel.
    assert docs[("RabbitmqCluster", "flashclaim-mq")]["spec"]["replicas"] == 3
    database = docs[("Cluster", "flashclaim-db")]["spec"]
    assert database["instances"] >= 2 and database["minSyncReplicas"] >= 1
    assert ("ScheduledBackup", "flashclaim-db-daily") in docs
    assert config["FLASHCLAIM_REDIS_URL"].startswith("redis+sentinel://")
    queues = [d for (kind, _), d in docs.items() if kind == "Queue"]
    assert {q["spec"]["type"] for q in queues} == {"quorum"}


def test_the_kubernetes_topology_is_what_the_code_declares() -> None:
    from flashclaim.devtools import k8s

    assert (K8S / "base" / "topology.yaml").read_text() == k8s.render(), (
        "deploy/k8s/base/topology.yaml is out of date: "
        "python -m flashclaim.devtools.k8s > deploy/k8s/base/topology.yaml"
    )


def test_the_compose_broker_loads_the_topology_the_code_declares() -> None:
    from flashclaim.core.policies import definitions

    shipped = json.loads((ROOT / "deploy/rabbitmq/definitions.json").read_text())
    expected = definitions(Settings().topology(), broker_major_version=4)
    assert {k: shipped[k] for k in expected} == expected
    assert [u["name"] for u in shipped["users"]] == ["flashclaim"]


def test_the_readme_instructions_match_the_files() -> None:
    """What "Running it for real" tells a reader to run names files, services, ports and
    Secrets that exist."""
    import yaml

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running it for real", 1)[1].split("\n## ", 1)[0]
    for path in set(re.findall(r"`((?:deploy|consumer|flashclaim)/[\w./-]+)`", section)):
        assert (ROOT / path).exists(), path
    for path in set(re.findall(r"kubectl apply -k (\S+)", section)):
        assert (ROOT / path / "kustomization.yaml").exists(), path
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service in re.findall(r"--scale (\w+)=", section):
        assert service in compose["services"], service
    published = {
        port.split(":")[-2] for s in compose["services"].values() for port in s.get("ports", [])
    }
    for port in re.findall(r"`(?:http://127\.0\.0\.1)?:(\d{4,5})`", section):
        assert port in published, port
    created = set(re.findall(r"create secret generic (\S+)", section))
    referenced = secret_names(rendered())
    made_by_operators = {"flashclaim-db-app", "flashclaim-mq-default-user"}
    assert referenced - made_by_operators == created
