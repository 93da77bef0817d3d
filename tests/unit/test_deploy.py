"""The container stack stays valid (checked without a Docker engine)."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from flashclaim.core.privileges import broker_permissions, redis_acl_rules
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
        "keys",
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
        for j in cast(list[dict[str, Any]], local["scrape_configs"])
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


def _compose() -> dict[str, Any]:
    import yaml

    result = subprocess.run(
        ["docker-compose", "config"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return dict(yaml.safe_load(result.stdout))


def test_compose_waits_for_a_database_that_takes_tcp_connections() -> None:
    """The postgres image's first start runs a setup server on the socket only: a socket
    check passes while TCP is refused, so the check is over TCP, and `schema apply`
    waits (bounded) for a database it cannot reach yet."""
    services = _compose()["services"]
    check = services["postgres"]["healthcheck"]["test"]
    assert check[:2] == ["CMD", "pg_isready"] and "-h" in check, check
    assert check[check.index("-h") + 1] in ("127.0.0.1", "localhost"), check
    command = services["schema"]["command"]
    assert command[:2] == ["schema", "apply"] and "--wait" in command, command
    assert float(command[command.index("--wait") + 1]) >= 60


def test_compose_keeps_the_brokers_node_across_recreation() -> None:
    """RabbitMQ's node is rabbit@<hostname>, its data in the volume that node's: without
    a fixed hostname a recreated container is a new node, and the queues are gone."""
    rabbitmq = _compose()["services"]["rabbitmq"]
    assert rabbitmq.get("hostname") == "rabbitmq"
    assert any(v.split(":")[1] == "/var/lib/rabbitmq" for v in rabbitmq["volumes"])


def test_compose_images_are_current_and_pinned_exactly() -> None:
    raw = (ROOT / "docker-compose.yml").read_text()
    assert not re.search(r"^version:", raw, re.M), "the `version` key is obsolete"
    services = _compose()["services"]
    images = {name: s["image"] for name, s in services.items()}
    for name, image in images.items():
        if "build" in services[name]:
            # The project's images: flashclaim's, and the edge's from its own Dockerfile.
            dockerfile = services[name]["build"]["dockerfile"]
            expected = {
                "deploy/Dockerfile": "flashclaim:latest",
                "deploy/edge/Dockerfile": "flashclaim-edge:latest",
            }
            assert image == expected[dockerfile], (name, image)
            continue
        tag = image.rsplit(":", 1)[1]
        # An exact release (major.minor.patch; PostgreSQL's are major.minor), perhaps a
        # variant, never a moving tag (`4.2-management`, `7.0`, `latest`).
        exact = r"\d+\.\d+(-[a-z]+)?" if name == "postgres" else r"v?\d+\.\d+\.\d+(-[a-z]+)?"
        assert re.fullmatch(exact, tag), (name, image)

    def major_minor(name: str) -> tuple[int, ...]:
        version = images[name].rsplit(":", 1)[1].lstrip("v").split("-")[0]
        return tuple(int(p) for p in version.split(".")[:2])

    # Supported series (docs/DEPLOYMENT.md, "Docker Compose", says how to bump them).
    assert major_minor("postgres") >= (17, 0)
    assert major_minor("rabbitmq") >= (4, 3)
    assert major_minor("redis") >= (8, 0)
    assert major_minor("prometheus") >= (3, 5)
    assert major_minor("grafana") >= (12, 0)


def test_compose_log_agent_reads_only_this_projects_containers() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        assert service.get("labels", {}).get("io.flashclaim.project") == "flashclaim", name
    alloy = (ROOT / "deploy/alloy/config.alloy").read_text()
    assert 'values = ["io.flashclaim.project=flashclaim"]' in alloy


def test_the_edge_configuration_is_valid_with_its_defaults_and_with_settings() -> None:
    """`haproxy -c` of deploy/edge/haproxy.cfg as Compose runs it (its defaults: the
    gateway's name may not resolve yet) and as the bench and tests run it."""
    from flashclaim.devtools import edge

    for settings in (
        {},
        {"FLASHCLAIM_EDGE_HOST": "127.0.0.1", "FLASHCLAIM_EDGE_PORT": "18090",
         "FLASHCLAIM_EDGE_GATEWAYS": "127.0.0.1:18080", "FLASHCLAIM_EDGE_IN_FLIGHT": "7"},
    ):  # fmt: skip
        result = subprocess.run(
            [edge.haproxy(), "-c", "-f", str(edge.CONFIG)],
            env={"PATH": "/usr/bin:/bin", **settings},
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Configuration file is valid" in result.stdout + result.stderr


def test_the_build_context_leaves_local_state_out() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".stack"} <= ignored, ignored
    # What the Dockerfile copies is not ignored.
    copied = re.findall(
        r"^COPY (?!--from)(.+) \S+$", (ROOT / "deploy/Dockerfile").read_text(), re.M
    )
    for sources in copied:
        for source in sources.split():
            assert source not in ignored, source


# -- the image ----------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["deploy/Dockerfile", "deploy/edge/Dockerfile"])
def test_the_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), dockerfile], cwd=ROOT, capture_output=True, text=True, check=False
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
CRDS = Path(__file__).resolve().parent / "crds"
KUBERNETES_VERSION = "1.30"
CORE_KINDS = {
    "ConfigMap",
    "Deployment",
    "HorizontalPodAutoscaler",
    "Job",
    "Namespace",
    "NetworkPolicy",
    "PodDisruptionBudget",
    "Service",
    "StatefulSet",
}
# The operators' resources, each validated against its CRD (tests/unit/crds/SOURCES.md).
CUSTOM = {
    "RabbitmqCluster",
    "Exchange",
    "Queue",
    "Binding",
    "Policy",
    "User",
    "Permission",
    "Cluster",
    "ScheduledBackup",
    "ObjectStore",
    "RedisReplication",
    "RedisSentinel",
    "ServiceMonitor",
    "PrometheusRule",
}
# Secrets the manifests read: made by an operator, or by the deployer (docs/DEPLOYMENT.md).
SECRETS = {
    "flashclaim-db-app",
    "flashclaim-db-service",
    "flashclaim-mq-app",
    "flashclaim-redis-app",
    "flashclaim-redis-acl",
    "flashclaim-secrets",
    "flashclaim-redis-auth",
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
    # Deprecated kustomize fields are warned about on stderr: v5's fields only.
    assert "deprecated" not in result.stderr.lower(), result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _strict(schema: Any) -> Any:
    """A CRD's structural schema as the API server applies it with strict field
    validation: an object's fields are the ones it declares (unless it preserves unknown
    fields), so a misspelt or removed field is an error, not silently pruned."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the served version's schema, from every CRD kept here
    (read once: they are large)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = _strict(version["schema"]["openAPIV3Schema"])
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def secret_names(node: Any) -> set[str]:
    """Every Secret a manifest reads (``secretKeyRef``, the backup's credentials, the
    Redis operator's ``redisSecret`` and ACL file, CNPG's and the Topology Operator's
    passwords)."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if (
                key
                in (
                    "secretKeyRef",
                    "accessKeyId",
                    "secretAccessKey",
                    "redisSecret",
                    "passwordSecret",
                    "importCredentialsSecret",
                )
                and "name" in value
            ):
                found.add(value["name"])
            if key == "acl" and "secret" in value:
                found.add(value["secret"]["secretName"])
            found |= secret_names(value)
    elif isinstance(node, list):
        for item in node:
            found |= secret_names(item)
    return found


def test_the_kubernetes_manifests_render_and_validate() -> None:
    import jsonschema
    import kubernetes_validate

    docs = rendered()
    schemas = crd_schemas()
    kinds = {d["kind"] for d in docs}
    assert kinds >= CORE_KINDS and kinds >= CUSTOM, kinds
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
            schema = schemas.get((doc["apiVersion"], doc["kind"]))
            assert schema is not None, f"{where}: no CRD serves {doc['apiVersion']}"
            errors = sorted(
                jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path)
            )
            assert not errors, f"{where}: " + "; ".join(
                f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]
            )
    # A secret is referenced, never stored.
    assert "Secret" not in kinds
    assert secret_names(docs) == SECRETS
    assert "password" not in {k.lower() for d in docs for k in d.get("data", {})}


def test_the_crd_check_refuses_what_an_operator_would_not_take() -> None:
    """The check above sees a misplaced field: the legacy CNPG setting the manifests moved
    away from, a field misspelt, a value out of its enum."""
    import jsonschema

    schemas = crd_schemas()
    docs = {(d["kind"], d["metadata"]["name"]): d for d in rendered()}
    cluster = docs[("Cluster", "flashclaim-db")]
    schema = schemas[(cluster["apiVersion"], "Cluster")]
    assert jsonschema.Draft7Validator(schema).is_valid(cluster)
    wrong = json.loads(json.dumps(cluster))
    wrong["spec"]["postgresql"]["synchronous"]["dataDurability"] = "sometimes"
    assert not jsonschema.Draft7Validator(schema).is_valid(wrong)
    wrong = json.loads(json.dumps(cluster))
    wrong["spec"]["postgresql"]["synchronus"] = wrong["spec"]["postgresql"].pop("synchronous")
    assert not jsonschema.Draft7Validator(schema).is_valid(wrong)


def test_the_kubernetes_workloads_keep_the_services_promises() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in rendered()}
    (config_name,) = [n for k, n in docs if k == "ConfigMap" and n.startswith("flashclaim-config-")]
    config = docs[("ConfigMap", config_name)]["data"]
    grace = float(config["FLASHCLAIM_SHUTDOWN_GRACE_SECONDS"])
    # Consumers take free slots: the count is the partitions', whatever the replicas.
    assert config["FLASHCLAIM_CONSUMER_INDEX"] == "auto"
    assert config["FLASHCLAIM_CONSUMER_COUNT"] == config["FLASHCLAIM_PARTITIONS"]
    workloads = [
        ("StatefulSet", "flashclaim-consumer"),
        ("Deployment", "flashclaim-gateway"),
        ("Deployment", "flashclaim-relay"),
        ("Job", "flashclaim-schema"),
        ("Deployment", "flashclaim-edge"),
    ]
    for kind, name in workloads:
        pod = docs[(kind, name)]["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
            # The config is the generated one (its name has the content's hash, so a
            # change rolls the pods).
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] == config_name, name
        if kind != "Job":
            assert pod["terminationGracePeriodSeconds"] > grace + 5 or name.endswith("relay")
    # The HPA owns the gateway's replicas: an apply does not reset them.
    assert "replicas" not in docs[("Deployment", "flashclaim-gateway")]["spec"]
    gateway = docs[("Deployment", "flashclaim-gateway")]["spec"]["template"]["spec"]
    probes = gateway["containers"][0]
    # Ready while it can answer (a JSON 503 when a server is away), not only while every
    # server answers: a blip of one must not empty the Service.
    assert probes["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for kind, name in workloads[:1] + workloads[2:3]:
        container = docs[(kind, name)]["spec"]["template"]["spec"]["containers"][0]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
    # The Job may be replaced by the next release (its template is immutable).
    assert docs[("Job", "flashclaim-schema")]["spec"]["ttlSecondsAfterFinished"] > 0
    assert ("PodDisruptionBudget", "flashclaim-gateway") in docs
    assert ("HorizontalPodAutoscaler", "flashclaim-gateway") in docs
    # The edge can send to as many gateway pods as the HPA may make, each by its address.
    edge = docs[("Deployment", "flashclaim-edge")]["spec"]["template"]["spec"]["containers"][0]
    edge_env = {e["name"]: e.get("value") for e in edge["env"]}
    hpa = docs[("HorizontalPodAutoscaler", "flashclaim-gateway")]["spec"]
    assert int(edge_env["FLASHCLAIM_EDGE_GATEWAY_SLOTS"]) == hpa["maxReplicas"]
    pods = docs[("Service", "flashclaim-gateway-pods")]["spec"]
    assert pods["clusterIP"] == "None"
    assert edge_env["FLASHCLAIM_EDGE_GATEWAYS"].startswith("flashclaim-gateway-pods.")
    assert {n for k, n in docs if k == "NetworkPolicy"}
    # Replicated servers: three broker nodes on three Kubernetes nodes, a standby that
    # is required to confirm commits, Sentinel, Redis bounded and with a password.
    broker = docs[("RabbitmqCluster", "flashclaim-mq")]["spec"]
    assert broker["replicas"] == 3
    anti = broker["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    database = docs[("Cluster", "flashclaim-db")]["spec"]
    assert database["instances"] >= 2 and "minSyncReplicas" not in database
    assert database["postgresql"]["synchronous"]["dataDurability"] == "required"
    assert database["postgresql"]["synchronous"]["number"] >= 1
    assert "backup" not in database  # barmanObjectStore is deprecated: the plugin archives
    assert database["plugins"][0]["name"] == "barman-cloud.cloudnative-pg.io"
    backup = docs[("ScheduledBackup", "flashclaim-db-daily")]["spec"]
    assert backup["method"] == "plugin"
    redis = docs[("RedisReplication", "flashclaim-redis")]["spec"]
    assert redis["kubernetesConfig"]["redisSecret"]["name"] == "flashclaim-redis-auth"
    assert redis["redisConfig"]["maxMemoryPercentOfLimit"] <= 80
    extra = docs[("ConfigMap", redis["redisConfig"]["additionalRedisConfig"])]["data"]
    assert "maxmemory-policy volatile-lru" in extra["redis-additional.conf"]
    assert redis["acl"]["secret"]["secretName"] == "flashclaim-redis-acl"
    # The services connect with their accounts of least privilege; only the schema Job
    # uses the database's owner, and it grants the services' role.
    services_role = database["managed"]["roles"][0]
    assert (services_role["name"], services_role["login"]) == ("flashclaim_app", True)
    assert "superuser" not in services_role and "createrole" not in services_role
    for kind, name in workloads[:3]:
        env = {
            e["name"]: e
            for e in docs[(kind, name)]["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        secret = env["FLASHCLAIM_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"]
        assert secret == "flashclaim-db-service", name
        assert env["AMQP_USERNAME"]["valueFrom"]["secretKeyRef"]["name"] == "flashclaim-mq-app"
        assert env["FLASHCLAIM_REDIS_URL"]["value"].startswith(
            "redis+sentinel://flashclaim_app:$(REDIS_APP_PASSWORD)@"
        ), name
        assert "FLASHCLAIM_REDIS_SENTINEL_PASSWORD" in env, name
    job = docs[("Job", "flashclaim-schema")]["spec"]["template"]["spec"]["containers"][0]
    assert job["args"][-2:] == ["--grant-to", "flashclaim_app"]
    assert job["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "flashclaim-db-app"
    user = docs[("User", "flashclaim-app")]["spec"]
    assert user["tags"] == [] and user["importCredentialsSecret"]["name"] == "flashclaim-mq-app"
    permission = docs[("Permission", "flashclaim-app")]["spec"]
    assert permission["permissions"] == broker_permissions(config["FLASHCLAIM_NAMESPACE"])
    assert config["FLASHCLAIM_AMQP_MANAGEMENT_URL"] == ""
    # Bearer tokens on, from the identity provider's JWKS.
    assert Settings.from_env(config).auth_enabled
    queues = [d for (kind, _), d in docs.items() if kind == "Queue"]
    assert {q["spec"]["type"] for q in queues} == {"quorum"}
    # kube-prometheus-stack selects the monitors and the rules by its release label.
    for kind, name in docs:
        if kind in ("ServiceMonitor", "PrometheusRule"):
            assert docs[(kind, name)]["metadata"]["labels"]["release"], name


def test_the_compose_broker_loads_the_topology_the_code_declares() -> None:
    from flashclaim.core.policies import definitions

    shipped = json.loads((ROOT / "deploy/rabbitmq/definitions.json").read_text())
    expected = definitions(Settings().topology(), broker_major_version=4)
    assert {k: shipped[k] for k in expected} == expected
    # The services' user is no administrator, and may use its namespace only.
    users = {u["name"]: u["tags"] for u in shipped["users"]}
    assert users == {"admin": ["administrator"], "flashclaim_app": []}
    permissions = {p.pop("user"): p for p in shipped["permissions"]}
    assert permissions["flashclaim_app"] == {"vhost": "/", **broker_permissions("flashclaim")}


def _resolved_compose() -> dict[str, Any]:
    import yaml

    resolved = subprocess.run(
        ["docker-compose", "config"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return dict(yaml.safe_load(resolved.stdout)["services"])


def test_compose_services_use_the_accounts_of_least_privilege() -> None:
    services = _resolved_compose()
    for name in ("consumer", "relay", "gateway", "keys"):
        env = services[name]["environment"]
        for variable in ("DATABASE_URL", "AMQP_URL", "REDIS_URL"):
            if f"FLASHCLAIM_{variable}" in env:
                assert "://flashclaim_app:" in env[f"FLASHCLAIM_{variable}"], (name, variable)
        assert env.get("FLASHCLAIM_AMQP_MANAGEMENT_URL", "") == "", name
    # The schema is the owner's, which grants the services' role its rows.
    schema = services["schema"]
    assert "://flashclaim:" in schema["environment"]["FLASHCLAIM_DATABASE_URL"]
    assert schema["command"][-2:] == ["--grant-to", "flashclaim_app"]
    postgres = services["postgres"]
    assert any("service-role.sql:/docker-entrypoint-initdb.d/" in v for v in postgres["volumes"])
    # Redis: the services' user has exactly flashclaim/core/privileges.py's rules.
    command = services["redis"]["command"]
    directives = {
        d.split(" ")[0]: d.split(" ")[1:] for d in " ".join(command).split(" --user ")[1:]
    }
    assert directives["default"] == ["off"]
    assert directives["flashclaim_app"] == ["on", ">flashclaim_app", *redis_acl_rules("flashclaim")]
    assert "flashclaim_app" in services["redis"]["healthcheck"]["test"]


def test_compose_gateway_takes_bearer_tokens_from_its_keys_service() -> None:
    services = _resolved_compose()
    gateway, keys = services["gateway"], services["keys"]
    env = Settings.from_env(gateway["environment"])
    assert env.auth_enabled and env.auth_jwks == "/keys/jwks.json"
    assert gateway["depends_on"]["keys"]["condition"] == "service_completed_successfully"
    assert gateway["volumes"] == ["authkeys:/keys:ro"] and keys["volumes"] == ["authkeys:/keys:rw"]
    assert keys["command"][:4] == ["token", "keys", "--dir", "/keys"]
    assert keys["environment"]["FLASHCLAIM_AUTH_ISSUER"] == env.auth_issuer


def test_the_deployment_instructions_match_the_files() -> None:
    """What docs/DEPLOYMENT.md tells a reader to run names files, services, ports and
    Secrets that exist."""
    import yaml

    section = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
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
