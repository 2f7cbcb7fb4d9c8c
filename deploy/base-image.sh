#!/usr/bin/env bash
# The local base image the Keel container builds FROM, made without any registry: a minimal Debian
# bookworm (debootstrap, from the Debian mirror apt already uses) plus Python 3.11 from Debian and
# the uv binary BentoML's Dockerfile installs packages with. Each stage is skipped when its image
# exists, so only the first run on a machine pays (about a minute).
#
#   deploy/base-image.sh [IMAGE]        default IMAGE: localhost/keel-python:3.11-bookworm
#
# Needs root, podman and debootstrap (make container-tools). MIRROR overrides the Debian mirror.
set -euo pipefail

IMAGE=${1:-localhost/keel-python:3.11-bookworm}
ROOTFS_IMAGE=localhost/keel-debian:bookworm-minbase
HERE=$(cd "$(dirname "$0")" && pwd)
UV=${UV:-$HERE/../.venv/bin/uv}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/containers.conf}

# The first http(s) Debian mirror in the host's apt sources (one-line or deb822 format).
mirror() {
    grep -rhoE '^(deb|URIs:)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | grep -oE 'https?://[^[:space:]]+' | head -n1 || true
}

[ -x "$UV" ] || { echo "deploy/base-image.sh: $UV: no uv binary (run make setup, or set UV=)" >&2; exit 2; }

if ! podman image exists "$ROOTFS_IMAGE"; then
    MIRROR=${MIRROR:-$(mirror)}
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    rootfs=$(mktemp -d /tmp/keel-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    echo "base image: debootstrap bookworm from $MIRROR"
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
        || { tail -n 20 "$rootfs.log" >&2; echo "debootstrap failed (log: $rootfs.log)" >&2; exit 1; }
    rm -f "$rootfs.log"
    # apt caches and lists are refetched by any later apt-get update; they only add weight here
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --quiet - "$ROOTFS_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
fi

if ! podman image exists "$IMAGE"; then
    context=$(mktemp -d /tmp/keel-base.XXXXXX)
    trap 'rm -rf "$context"' EXIT
    cp "$HERE/Containerfile.python" "$context/Containerfile"
    cp "$UV" "$context/uv"
    echo "base image: python3.11 layer -> $IMAGE"
    podman build --quiet --network host --build-arg "BASE=$ROOTFS_IMAGE" -t "$IMAGE" "$context" >/dev/null
fi
echo "base image: $IMAGE"
