#!/usr/bin/env bash
# `make image`: builds deploy/Dockerfile (flashclaim) and deploy/edge/Dockerfile (the
# edge, HAProxy) with podman, no Docker engine and no registry needed.
#
# The Dockerfile's base is an ARG whose default is the official Python image. Where no
# registry of images can be reached (as on this project's CI), the base is made here from
# Debian packages (mmdebstrap: Debian 12 with python3 and python3-venv, the same Python
# 3.11 line) and imported into podman once; later builds reuse it. Set
# FLASHCLAIM_IMAGE_BASE to build on another base, e.g. the official one where Docker Hub
# is reachable:
#   FLASHCLAIM_IMAGE_BASE=docker.io/library/python:3.11-slim-bookworm make image
#
# The image is tagged localhost/flashclaim:<version> and localhost/flashclaim:latest
# (FLASHCLAIM_IMAGE names another), with the version and the commit as OCI labels; the
# edge's localhost/flashclaim-edge:<version> and :latest (FLASHCLAIM_EDGE_IMAGE), on the
# same Debian base (FLASHCLAIM_EDGE_IMAGE_BASE names another: debian:bookworm-slim, say).
# podman runs with the vfs storage driver and chroot isolation, which need neither a
# kernel overlay nor user namespaces (deploy/podman.sh holds the flags).
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/install-deps.sh --image
# shellcheck source=deploy/podman.sh
source deploy/podman.sh

IMAGE="${FLASHCLAIM_IMAGE:-localhost/flashclaim:latest}"
EDGE_IMAGE="${FLASHCLAIM_EDGE_IMAGE:-localhost/flashclaim-edge:latest}"
DEBIAN_BASE="localhost/debian-python:bookworm"
BASE="${FLASHCLAIM_IMAGE_BASE:-$DEBIAN_BASE}"
EDGE_BASE="${FLASHCLAIM_EDGE_IMAGE_BASE:-$DEBIAN_BASE}"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)"
REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then
  REVISION="${REVISION}-dirty"
fi

if { [ "$BASE" = "$DEBIAN_BASE" ] || [ "$EDGE_BASE" = "$DEBIAN_BASE" ]; } \
  && ! podman_ image exists "$DEBIAN_BASE"; then
  echo "flashclaim image: making the base $DEBIAN_BASE from Debian packages (about a minute)" >&2
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  # passwd: useradd and groupadd for the image's non-root user.
  mmdebstrap --quiet --variant=apt \
    --include=python3,python3-venv,python-is-python3,ca-certificates,passwd \
    bookworm "$work/base.tar"
  podman_ import --quiet \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
    "$work/base.tar" "$DEBIAN_BASE" >/dev/null
fi

echo "flashclaim image: building $IMAGE (version $VERSION, revision $REVISION) on $BASE" >&2
started=$SECONDS
# The machine's CA bundle, for pip behind a proxy that re-signs TLS (a secret: in no layer).
CA="${FLASHCLAIM_IMAGE_CA:-/etc/ssl/certs/ca-certificates.crt}"
secret=()
if [ -s "$CA" ]; then
  secret=(--secret "id=ca-certificates,src=$CA")
fi
# --format docker keeps the HEALTHCHECK (the OCI format has no such field).
podman_ build "${secret[@]}" --quiet --isolation=chroot --network=host --format docker \
  --build-arg "BASE=$BASE" --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION" \
  -t "$IMAGE" -t "${IMAGE%:*}:$VERSION" -f deploy/Dockerfile . >/dev/null
echo "flashclaim image: $IMAGE built in $((SECONDS - started)) s" >&2

echo "flashclaim image: building the edge's $EDGE_IMAGE on $EDGE_BASE" >&2
started=$SECONDS
podman_ build --quiet --isolation=chroot --network=host --format docker \
  --build-arg "BASE=$EDGE_BASE" --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION" \
  -t "$EDGE_IMAGE" -t "${EDGE_IMAGE%:*}:$VERSION" -f deploy/edge/Dockerfile . >/dev/null
echo "flashclaim image: $EDGE_IMAGE built in $((SECONDS - started)) s" >&2
# The previous build's layers, untagged now (vfs keeps a full copy of each).
podman_ image prune --force >/dev/null
