"""The service as users meet it: a real `bentoml serve` process, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.preprocessing import find_images
from tests.conftest import Server
from tests.test_training import REQUIRED_TEST_ACCURACY


def post(url: str, body: bytes, content_type: str, timeout: float = 30) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def classify_file(url: str, data: bytes, query: str = "") -> tuple[int, dict]:
    return post(f"{url}/classify{query}", *multipart("image", "upload.png", data))


def test_classifies_generated_test_images_correctly(server, shapes_data):
    images = find_images(shapes_data / "test")[::4]  # 50 images, every class
    correct = 0
    for path in images:
        status, answer = classify_file(server.url, path.read_bytes())
        assert status == 200, answer
        assert answer["model"] == "keel-test" and len(answer["predictions"]) == 5
        scores = [p["score"] for p in answer["predictions"]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
        correct += answer["predictions"][0]["label"] == path.parent.name
    assert correct / len(images) >= REQUIRED_TEST_ACCURACY


def test_raw_image_body_and_top_k(server, shapes_data):
    path = find_images(shapes_data / "test")[0]
    status, answer = post(f"{server.url}/classify?top_k=2", path.read_bytes(), "image/png")
    assert status == 200 and len(answer["predictions"]) == 2
    assert set(answer["timing_ms"]) == {"preprocess", "inference", "total"}
    # the same image the multipart way gets the same answer
    _, again = classify_file(server.url, path.read_bytes(), "?top_k=2")
    assert again["predictions"] == answer["predictions"]


@pytest.mark.parametrize("body, content_type, status, message", [
    (b"", "image/png", 400, "empty upload"),
    (b"this is not an image", "image/jpeg", 400, "not a recognised image format"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10", "image/png", 400, "image"),
    (b"{}", "application/json", 415, "unsupported content type"),
    ("truncated-jpeg", "image/jpeg", 400, "truncated"),
    ("bomb", "image/png", 400, "over the limit of 40000000"),  # 100 megapixels by its header
])
def test_bad_uploads_get_a_4xx_json_error(server, body, content_type, status, message):
    body = BAD_BODIES[body]() if isinstance(body, str) else body
    code, answer = post(f"{server.url}/classify", body, content_type)
    assert code == status and message in answer["error"]


def png_header(width: int, height: int) -> bytes:
    """A PNG that is only a header: enough for the pixel check, which must come before any decode."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()[: len(buffer.getvalue()) // 3]


BAD_BODIES = {"truncated-jpeg": truncated_jpeg, "bomb": lambda: png_header(10_000, 10_000)}


def test_bad_multipart_and_parameters_get_a_4xx_json_error(server, shapes_data):
    data = find_images(shapes_data / "test")[0].read_bytes()
    code, answer = post(f"{server.url}/classify", *multipart("picture", "x.png", data))
    assert code == 400 and "'image'" in answer["error"]
    code, answer = classify_file(server.url, data, "?top_k=zero")
    assert code == 400 and "top_k" in answer["error"]
    code, answer = classify_file(server.url, b"garbage")
    assert code == 400 and "not a recognised image format" in answer["error"]
    # and the worker is still alive afterwards
    assert classify_file(server.url, data)[0] == 200


def test_concurrent_requests_are_all_answered_correctly(server, shapes_data):
    """Requests batched together get the answers they get alone (up to float noise between batch sizes)."""
    paths = find_images(shapes_data / "test")[::10]
    alone = {path: classify_file(server.url, path.read_bytes())[1]["predictions"] for path in paths}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda p: (p, classify_file(server.url, p.read_bytes())), paths * 4))
    for path, (status, answer) in answers:
        assert status == 200, answer
        expected = {p["label"]: p["score"] for p in alone[path]}
        for prediction in answer["predictions"]:
            assert abs(prediction["score"] - expected.get(prediction["label"], -1)) < 1e-4, (path, answer, alone[path])
    # and they really were batched: BentoML's histogram of formed batch sizes has a batch above 1
    images, batches = batch_size_totals(server.url)
    assert images > batches, (images, batches)


def batch_size_totals(url: str) -> tuple[float, float]:
    """(images, batches) the adaptive batcher has sent to ONNX Runtime so far (Keel's own histogram)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    total = lambda suffix: sum(float(line.rsplit(" ", 1)[1]) for line in lines  # noqa: E731
                               if line.startswith(f"keel_batch_size_{suffix}{{"))
    return total("sum"), total("count")


def test_metadata_describes_model_and_provider(server):
    with urllib.request.urlopen(f"{server.url}/metadata", timeout=10) as response:
        meta = json.loads(response.read())
    assert meta["name"] == "keel-test" and len(meta["labels"]) == 10
    assert meta["input_size"] == [64, 64] and meta["preprocessing"]["layout"] == "NCHW"
    assert meta["provider"] == "CPUExecutionProvider"  # no GPU here
    assert meta["batching"]["max_batch_size"] >= 1


def test_a_cheap_model_gets_one_worker_per_cpu_each_with_one_thread(server, exported_model):
    """KEEL_WORKERS unset: `bentoml serve` times the model and chooses; the workers run what it chose."""
    from service.inference import CHEAP_INFERENCE_MS, container_cpus, cpu_cost_ms

    assert cpu_cost_ms(exported_model) < CHEAP_INFERENCE_MS  # the 64 px test model: a fraction of a ms
    with urllib.request.urlopen(f"{server.url}/metadata", timeout=10) as response:
        meta = json.loads(response.read())
    assert meta["service"]["workers"] == container_cpus()
    assert meta["cpu_threads"] == (1 if container_cpus() > 1 else container_cpus())
    assert meta["service"]["decode"] == "event loop"  # a CPU per worker: no spare one for decode threads
    assert "HTTP worker(s) with" in server.log_path.read_text()  # the choice and its reason are logged


def test_missing_model_fails_at_start_with_a_clear_message(tmp_path):
    missing = tmp_path / "nope.onnx"
    server = Server({"KEEL_MODEL": str(missing), "BENTOML_HOME": str(tmp_path)}, tmp_path / "server.log")
    try:
        with pytest.raises(RuntimeError) as error:
            server.wait_ready(timeout=90)
    finally:
        server.stop()
    assert f"{missing}: no such model file" in str(error.value)


def test_oversized_uploads_are_refused_before_decoding(server):
    """413 as soon as the declared or streamed size passes KEEL_MAX_UPLOAD_BYTES (default 20 MiB).

    Raw sockets, because the server answers before taking the whole body, which clients that
    only read after sending everything (urllib) see as a reset connection.
    """
    limit = 20 * 1024 * 1024
    declared = f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {limit + 1}\r\n\r\n"
    code, answer = raw_request(server.port, declared.encode())
    assert code == 413 and "over the limit" in answer["error"]

    chunk = b"\x00" * (1024 * 1024)
    streamed = (b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
                + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 20 + b"1\r\n\x00\r\n")
    # limit + 1 bytes and no end marker: the server refuses on the last byte, having read everything
    # (so it closes cleanly instead of resetting a connection with unread data)
    code, answer = raw_request(server.port, streamed)
    assert code == 413 and "over the limit" in answer["error"]


def raw_request(port: int, data: bytes) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
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
