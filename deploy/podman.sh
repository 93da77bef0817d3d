# podman as this project runs it on a machine without a Docker engine (sourced by
# deploy/image.sh; tests/image/ uses the same flags): the vfs storage driver (no kernel
# overlay needed), runc (crun fails on a hybrid cgroup layout) and cgroupfs (no systemd).
# Containers also need `--ulimit nofile=...` at or under the machine's hard limit.
podman_() {
  podman --storage-driver=vfs --runtime runc --cgroup-manager=cgroupfs "$@"
}
