"""What the tests share: running Python as a user would, a real `bentoml serve` on a free loopback port,
and talking to it (one multipart builder, requests that return the status and the JSON answer).
The fixtures built from these (data set, training run, model, servers) are in tests/conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(*args: str, env: dict | None = None, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run `python ARGS` from the repository root, as a user would from the README."""
    return subprocess.run([sys.executable, *args], cwd=REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A real `bentoml serve` process on 127.0.0.1:<free port>, always stopped (see `serve`)."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        bentoml = str(Path(sys.executable).with_name("bentoml"))
        self.process = subprocess.Popen(
            [bentoml, "serve", "service.service:Classifier", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO, env={**os.environ, "BENTOML_DO_NOT_TRACK": "True", **env}, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-5000:]

    def stop(self) -> int:
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()
        return self.process.returncode


@contextlib.contextmanager
def serve(home: Path, ready: bool = True, **env: str) -> Iterator[Server]:
    """`bentoml serve` with KEEL_* settings `env` and its own BENTOML_HOME `home` (its log inside), ready
    unless `ready` is False, and stopped on the way out whatever happened."""
    home.mkdir(parents=True, exist_ok=True)
    server = Server({"BENTOML_HOME": str(home), **env}, home / "server.log")
    try:
        if ready:
            server.wait_ready()
        yield server
    finally:
        server.stop()


# --- talking to a server -----------------------------------------------------------------------------------


def multipart(parts: list[tuple[str, str | None, bytes]] = (), fields: dict[str, str] | None = None,
              boundary: str | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type: plain `fields` first, then each of `parts`,
    (field name, file name, bytes) as a file part, or (field name, None, bytes) as a plain field."""
    boundary = boundary or uuid.uuid4().hex
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                    for name, value in (fields or {}).items())
    for field, filename, data in parts:
        if filename is None:
            body += f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n'.encode() + data + b"\r\n"
        else:
            body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request(url: str, body: bytes | None = None, content_type: str | None = None, method: str | None = None,
            timeout: float = 30) -> tuple[int, dict]:
    """(status, JSON answer) of one request: a POST when there is a body, else a GET."""
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"),
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def classify_file(url: str, data: bytes, query: str = "") -> tuple[int, dict]:
    """POST /classify with `data` as the multipart file field `image`."""
    return request(f"{url}/classify{query}", *multipart([("image", "upload.png", data)]))


def raw_request(port: int, data: bytes, timeout: float = 30) -> tuple[int, dict]:
    """Send `data` as it is and read one response, without closing our side (so a body can be left
    unfinished): (status, JSON answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        response = b""
        while b"\r\n\r\n" not in response or len(response.split(b"\r\n\r\n", 1)[1]) < content_length(response):
            part = sock.recv(65536)
            if not part:
                break
            response += part
    head, body = response.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body[: content_length(response)])


def content_length(response: bytes) -> int:
    for line in response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0
