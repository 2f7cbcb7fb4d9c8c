"""Start-up and first-request latency of the Keel container image, as docs/deployment.md reports them.

    python deploy/measure.py IMAGE_FILE [--image keel:latest] [--runs 5]

Each run starts a fresh container (`podman run --init`, host network, 127.0.0.1:<free port>) and
measures: cold start (from `podman run` to the first 200 from /readyz, polled every 50 ms), the
first /classify of IMAGE_FILE after that, a second one, and `podman stop` (SIGTERM to exit).
Prints every run and the median with min-max. Standard library only; needs podman and the image.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

CONTAINERS_CONF = str(Path(__file__).resolve().parent / "containers.conf")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def classify(url: str, data: bytes) -> float:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x\"\r\n\r\n").encode() \
        + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}/classify", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()
        if response.status != 200:
            raise RuntimeError(f"/classify answered {response.status}")
    return (time.perf_counter() - started) * 1000


def one_run(image: str, data: bytes, timeout: float = 120) -> dict[str, float]:
    port = free_port()
    url, name = f"http://127.0.0.1:{port}", f"keel-measure-{port}"
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", CONTAINERS_CONF)}
    started = time.perf_counter()
    subprocess.run(["podman", "run", "-d", "--rm", "--init", "--name", name, "--network", "host",
                    "-e", "BENTOML_HOST=127.0.0.1", "-e", f"BENTOML_PORT={port}", image],
                   env=env, check=True, capture_output=True, timeout=timeout)
    try:
        while True:
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"{image} not ready after {timeout}s")
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        ready_s = time.perf_counter() - started
        first_ms, second_ms = classify(url, data), classify(url, data)
    finally:
        stopping = time.perf_counter()
        subprocess.run(["podman", "stop", "--time", "30", name], env=env, capture_output=True, timeout=90)
        stop_s = time.perf_counter() - stopping
    return {"cold_start_s": ready_s, "first_request_ms": first_ms, "second_request_ms": second_ms, "stop_s": stop_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("image_file", type=Path, help="an image to classify, e.g. data/shapes/test/star/00000.png")
    parser.add_argument("--image", default="keel:latest", help="container image (default: keel:latest)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    if not args.image_file.is_file():
        parser.error(f"{args.image_file}: no such file")
    data = args.image_file.read_bytes()
    runs = []
    for i in range(args.runs):
        runs.append(one_run(args.image, data))
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[-1].items()), flush=True)
    print(f"median (min-max) of {args.runs} runs:")
    for key in runs[0]:
        values = [run[key] for run in runs]
        print(f"  {key}: {statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
