"""The service under operational conditions, over real HTTP: start-up, readiness, overload, timeouts."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from service.preprocessing import find_images
from tests.support import classify_file, raw_request, serve

pytestmark = pytest.mark.slow  # real servers

WARMUP_DELAY_S = 15  # long enough that a loaded machine still sees the server answer inside the hold
TIMEOUT_S = 3


def get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_readiness_waits_for_warm_up_then_overload_and_timeouts_are_json(exported_model, shapes_data, tmp_path):
    """One server, started with a deliberately slow warm-up, one request in progress at most and a
    3 s request timeout:
    - while warming up, /readyz is 503 and /classify a 503 JSON, never a hang;
    - once warm, /readyz is 200 and /classify answers;
    - a request past KEEL_MAX_CONCURRENCY is refused at once with 429 JSON;
    - a request that is not done within KEEL_REQUEST_TIMEOUT_S (here a client that stalls mid-upload)
      gets 503 JSON, and the server goes on answering."""
    # One worker: BentoML gives each worker ceil(KEEL_MAX_CONCURRENCY / workers) slots, so with two (what
    # this model gets by default on 2 CPUs) the second request could take the other worker's slot.
    image = find_images(shapes_data / "test")[0].read_bytes()
    with serve(tmp_path, ready=False, KEEL_MODEL=str(exported_model), KEEL_WARMUP_DELAY_S=str(WARMUP_DELAY_S),
               KEEL_MAX_CONCURRENCY="1", KEEL_WORKERS="1", KEEL_REQUEST_TIMEOUT_S=str(TIMEOUT_S)) as server:
        seen = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.process.poll() is None, server.output()
            try:
                status, _ = get(server.url + "/readyz", timeout=15)
            except OSError:  # not listening yet
                time.sleep(0.2)
                continue
            seen.add(status)
            if status == 200:
                break
            assert status == 503
            if len(seen) == 1:  # once, while warming up: inference is refused cleanly
                code, answer = classify_file(server.url, image)
                assert code == 503 and "retry later" in answer["error"], answer
            time.sleep(0.2)
        assert seen == {503, 200}, (seen, server.output())
        assert classify_file(server.url, image)[0] == 200

        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as stalled:
            # headers and a tenth of the body, then nothing: holds the only slot until the timeout
            stalled.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(image) + image[: len(image) // 10])
            time.sleep(0.5)
            code, answer = classify_file(server.url, image)
            assert code == 429 and answer["error"], answer  # refused, not queued behind the stalled one
            response = b""
            while b"\r\n\r\n" not in response:
                response += stalled.recv(65536)
            head, body = response.split(b"\r\n\r\n", 1)
            length = int(head.lower().split(b"content-length:")[1].split()[0])
            while len(body) < length:  # the body may come in a later segment than the headers
                body += stalled.recv(65536)
        assert head.split()[1] == b"503" and b"retry-after" in head.lower()
        assert f"timeout of {TIMEOUT_S} s" in json.loads(body[:length])["error"]
        assert classify_file(server.url, image)[0] == 200


def test_gpu_required_but_not_obtained_stops_the_server_with_a_clear_message(exported_model, tmp_path):
    """KEEL_DEVICE=cuda on this CPU machine (onnxruntime-gpu still claims CUDA): the server refuses to
    start, with the reason and a failing exit status, instead of a worker respawning behind a live /livez."""
    with serve(tmp_path, ready=False, KEEL_MODEL=str(exported_model), KEEL_DEVICE="cuda") as server:
        with pytest.raises(RuntimeError) as error:
            server.wait_ready(timeout=90)
    assert "KEEL_DEVICE=cuda requires the GPU" in str(error.value) and server.process.returncode != 0


def test_a_session_that_cannot_get_cuda_is_refused_when_cuda_is_required(exported_model):
    """A GPU that is visible but unusable (no driver, wrong CUDA) is only found when the session is
    made: onnxruntime-gpu falls back to the CPU silently, and Keel refuses that (the engine then stops
    the whole server). On this CPU host the session is made without the import-time check."""
    from service.inference import ModelLoadError, OnnxClassifier

    with pytest.raises(ModelLoadError, match="KEEL_DEVICE=cuda requires the GPU"):
        OnnxClassifier(exported_model, "cuda")


@pytest.mark.parametrize("env, message", [
    ({"KEEL_MODELS": "alexnet=MODEL,inception"}, "KEEL_MODELS entries are name=path_or_tag"),
    ({"KEEL_MODEL": "MODEL", "KEEL_DEFAULT_MODEL": "nope"}, "KEEL_DEFAULT_MODEL 'nope' is not a served model"),
])
def test_bad_configuration_fails_at_start_with_a_clear_message(exported_model, tmp_path, env, message):
    env = {key: value.replace("MODEL", str(exported_model)) for key, value in env.items()}
    with serve(tmp_path, ready=False, **env) as server:
        with pytest.raises(RuntimeError) as error:
            server.wait_ready(timeout=90)
    assert message in str(error.value) and server.process.returncode != 0


def test_oversized_batch_requests_are_refused(server):
    limit = 20 * 1024 * 1024
    head = (f"POST /classify_batch HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {limit + 1}\r\n\r\n")
    code, answer = raw_request(server.port, head.encode())
    assert code == 413 and "over the limit" in answer["error"]
