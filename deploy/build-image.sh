#!/usr/bin/env bash
# Build the Keel container image from a Bento with podman, without any registry:
#
#   deploy/build-image.sh [BENTO] [IMAGE]     defaults: keel:latest keel:latest (localhost/keel:latest)
#
# The Bento (make bento) holds the service, the model and bentofile.yaml's docker options; this
# script only supplies what the host must: the local base image (deploy/base-image.sh), podman
# settings for restricted hosts (deploy/containers.conf), host networking for the package
# downloads, and the host's CA bundle when pip here trusts a custom one (an egress proxy).
# BENTOML_HOME and BENTOML (the bentoml command) default to the clone's .bentoml and .venv; UV to
# the uv beside that bentoml.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
BENTO=${1:-keel:latest}
IMAGE=${2:-keel:latest}
BENTOML=${BENTOML:-$REPO/.venv/bin/bentoml}
BENTOML=$(realpath "$(command -v "$BENTOML")") || { echo "deploy/build-image.sh: no bentoml command (make setup)" >&2; exit 2; }
# the base image's uv: the one installed beside that bentoml (requirements/dev.txt pins it)
export UV=${UV:-$(dirname "$BENTOML")/uv}
export BENTOML_HOME=$(realpath -m "${BENTOML_HOME:-$REPO/.bentoml}")
export BENTOML_DO_NOT_TRACK=True
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/containers.conf}

command -v podman >/dev/null || { echo "deploy/build-image.sh: podman not found (make container-tools)" >&2; exit 2; }
"$HERE/base-image.sh"

# KEEL_CUDA=0: leave out the CUDA/cuDNN wheels (deploy/cuda-libraries.sh), for CPU-only hosts
opts=(--opt network=host --opt "build-arg=KEEL_CUDA=${KEEL_CUDA:-1}")
ca=${PIP_CERT:-${SSL_CERT_FILE:-}}
if [ -n "$ca" ] && [ -f "$ca" ]; then
    opts+=(--opt "volume=$(realpath "$ca"):/etc/ssl/certs/ca-certificates.crt:ro")
fi
# From /: bentoml containerize refuses the Bento's own dockerfile_template unless the temporary
# build context lies under the working directory (BentoML 1.4.39's resolve_user_filepath check).
cd /
exec "$BENTOML" containerize "$BENTO" --backend podman -t "$IMAGE" "${opts[@]}"
