#!/bin/sh
# bentofile.yaml's docker.setup_script: runs as root in the image build, after the Bento's Python
# requirements (requirements/serve.txt) are installed into /app/.venv.
#
# onnxruntime-gpu 1.31 needs CUDA 13 and cuDNN 9, newer than any CUDA base image BentoML can
# generate; its [cuda,cudnn] extra brings both as nvidia-* wheels, which
# service.inference.preload_cuda_libraries loads at start-up (onnxruntime.preload_dlls). So the
# image needs only a plain Python base, and the same image runs on a GPU host (NVIDIA container
# toolkit) and on a CPU-only one. The version is the one serve.txt pinned, read back from the
# installed package, so the pin lives in one place. The dev venv keeps the bare package: the
# libraries are about 2 GB that only a GPU host uses.
set -eu
if [ "${KEEL_CUDA:-1}" = 0 ]; then
    echo "KEEL_CUDA=0: a CPU-only image, without the CUDA/cuDNN libraries"
    exit 0
fi
version=$(python -c 'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))')
uv pip install "onnxruntime-gpu[cuda,cudnn]==$version"
