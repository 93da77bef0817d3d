#!/usr/bin/env bash
# Installs the Debian packages flashclaim's local stack needs, if any is missing;
# with --test, also what `make test` drives the operators' console with (chromium and
# chromium-driver, headless, through selenium) and the edge it runs (HAProxy,
# deploy/edge/haproxy.cfg);
# with --bench, also what `make bench` drives the load with (wrk, and Go to build its
# open-loop generator, bench/openloop) and the edge of its overload row; with --image, what
# `make image` and `make test-image` build and run the image with (podman, runc,
# mmdebstrap).
# Idempotent: does nothing when everything is there.
set -euo pipefail

missing=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] \
  || missing+=(rabbitmq-server)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
# `kubectl kustomize` renders deploy/k8s in the tests (any kubectl will do).
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
# `make run` shows live metrics in a Prometheus of its own; the tests check its rules.
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 \
  || missing+=(prometheus)
if [ "${1:-}" = "--test" ]; then
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
fi
if [ "${1:-}" = "--test" ] || [ "${1:-}" = "--bench" ]; then
  command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
fi
if [ "${1:-}" = "--bench" ]; then
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
  command -v go >/dev/null 2>&1 || missing+=(golang-go)
fi
if [ "${1:-}" = "--image" ]; then
  command -v podman >/dev/null 2>&1 || missing+=(podman)
  command -v runc >/dev/null 2>&1 || missing+=(runc)
  command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "flashclaim: installing Debian packages: ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
# Packages must not start their system-wide services: flashclaim runs its own servers.
export DEBIAN_FRONTEND=noninteractive RUNLEVEL=1
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
