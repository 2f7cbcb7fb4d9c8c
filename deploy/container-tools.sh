#!/usr/bin/env bash
# Make sure the container tools are here: podman (with runc) builds and runs the image, debootstrap
# makes its base. Installs them from Debian when they are missing and we are root with apt-get
# (CI: `make test` runs this first); otherwise says what is missing and succeeds, and
# tests/test_container.py skips with the same reason. Never fails the caller.
set -uo pipefail
export PATH=$PATH:/usr/sbin:/sbin

missing=()
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "container tools: installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # a fresh machine may have no package lists yet
    if apt-get install -y -q podman runc debootstrap >/tmp/keel-container-tools.log 2>&1 \
        || { apt-get update -q >>/tmp/keel-container-tools.log 2>&1 \
             && apt-get install -y -q podman runc debootstrap >>/tmp/keel-container-tools.log 2>&1; }; then
        exit 0
    fi
    echo "container tools: apt-get failed (log: /tmp/keel-container-tools.log); the container test will skip"
else
    echo "container tools: ${missing[*]} missing; the container test will skip" \
         "(install as root: apt-get install -y podman runc debootstrap)"
fi
exit 0
