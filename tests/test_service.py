"""The service as users meet it: a real `bentoml serve` process, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.preprocessing import find_images
from tests.support import REPO, classify_file, multipart, raw_request, request, serve
from tests.test_training import REQUIRED_TEST_ACCURACY

pytestmark = pytest.mark.slow  # a real server, and the tiny training run's model


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
    status, answer = request(f"{server.url}/classify?top_k=2", path.read_bytes(), "image/png")
    assert status == 200 and len(answer["predictions"]) == 2
    assert set(answer["timing_ms"]) == {"preprocess", "inference", "total"}
    # the same image the multipart way gets the same answer
    _, again = classify_file(server.url, path.read_bytes(), "?top_k=2")
    assert again["predictions"] == answer["predictions"]


def test_a_bad_upload_is_a_4xx_and_the_worker_lives_on(server, shapes_data):
    """The whole list of bad requests is tests/test_api.py's, in this process; here, over real HTTP,
    that one is refused with a JSON 4xx and the worker goes on answering."""
    data = find_images(shapes_data / "test")[0].read_bytes()
    code, answer = request(f"{server.url}/classify", *multipart([("picture", "x.png", data)]))
    assert code == 400 and "'image'" in answer["error"]
    code, answer = classify_file(server.url, b"garbage", "?top_k=2")
    assert code == 400 and "not a recognised image format" in answer["error"]
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
    _, meta = request(f"{server.url}/metadata")
    assert meta["name"] == "keel-test" and len(meta["labels"]) == 10
    assert meta["input_size"] == [64, 64] and meta["preprocessing"]["layout"] == "NCHW"
    assert meta["provider"] == "CPUExecutionProvider"  # no GPU here
    assert meta["batching"]["max_batch_size"] >= 1


def test_a_cheap_model_gets_one_worker_per_cpu_each_with_one_thread(server, exported_model):
    """KEEL_WORKERS unset: `bentoml serve` times the model and chooses; the workers run what it chose."""
    from service.inference import container_cpus
    from service.workers import CHEAP_INFERENCE_MS, cpu_cost_ms

    assert cpu_cost_ms(exported_model) < CHEAP_INFERENCE_MS  # the 64 px test model: a fraction of a ms
    _, meta = request(f"{server.url}/metadata")
    assert meta["service"]["workers"] == container_cpus()
    assert meta["cpu_threads"] == (1 if container_cpus() > 1 else container_cpus())
    assert meta["service"]["decode"] == "event loop"  # a CPU per worker: no spare one for decode threads
    assert "HTTP worker(s) with" in server.log_path.read_text()  # the choice and its reason are logged


def test_missing_model_fails_at_start_with_a_clear_message(tmp_path):
    missing = tmp_path / "nope.onnx"
    with serve(tmp_path, ready=False, KEEL_MODEL=str(missing)) as server:
        with pytest.raises(RuntimeError) as error:
            server.wait_ready(timeout=90)
    assert f"{missing}: no such model file" in str(error.value)


def test_oversized_uploads_are_refused_before_decoding(server):
    """413 as soon as the declared or streamed size passes KEEL_MAX_UPLOAD_BYTES (default 20 MiB), raw
    or multipart, to /classify and /classify_batch.

    Raw sockets, because the server answers before taking the whole body, which clients that
    only read after sending everything (urllib) see as a reset connection.
    """
    limit = 20 * 1024 * 1024
    head = "POST {} HTTP/1.1\r\nHost: x\r\nContent-Type: {}\r\n{}\r\n"
    # Declared too large: refused on the headers, without a byte of body (we never send one).
    for path, content_type in (("/classify", "image/png"), ("/classify", "multipart/form-data; boundary=b"),
                               ("/classify_batch", "multipart/form-data; boundary=b")):
        code, answer = raw_request(server.port, head.format(path, content_type, "Content-Length: 1073741824\r\n")
                                   .encode())
        assert code == 413 and "over the limit" in answer["error"], (path, content_type)
    # Streamed with no length: limit + 1 bytes and no end marker. The server refuses on the last byte,
    # having read everything (so it closes cleanly instead of resetting a connection with unread data).
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n\r\n'
    for content_type, first in (("image/png", b""), ("multipart/form-data; boundary=b", part)):
        body = first + b"\x00" * (limit + 1 - len(first))
        pieces = [body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)]
        chunks = b"".join(b"%x\r\n" % len(piece) + piece + b"\r\n" for piece in pieces)
        code, answer = raw_request(server.port, head.format("/classify", content_type,
                                                            "Transfer-Encoding: chunked\r\n").encode() + chunks)
        assert code == 413 and "over the limit" in answer["error"], content_type


def test_bentoml_sync_client_classifies_as_in_the_readme(server, shapes_data, tmp_path):
    """`bentoml.SyncHTTPClient(url).classify(image=Path(...), top_k=3)`, as BentoML's examples and the
    README call a service; and the README's example itself, run as written."""
    import bentoml

    path = find_images(shapes_data / "test" / "star")[0]
    with bentoml.SyncHTTPClient(server.url) as client:
        answer = client.classify(image=path, top_k=3)
        assert answer["model"] == "keel-test" and len(answer["predictions"]) == 3
        assert answer["predictions"] == classify_file(server.url, path.read_bytes(), "?top_k=3")[1]["predictions"]
        batch = client.classify_batch(images=[path, Path(__file__)], top_k=1)
        assert [sorted(result) for result in batch["results"]] == [["filename", "predictions"], ["error", "filename"]]
        assert client.metadata(model="keel-test")["name"] == "keel-test"
        with pytest.raises(bentoml.exceptions.BentoMLException, match="unknown model"):
            client.classify(image=path, model="nope")
    readme = (REPO / "README.md").read_text()
    example = readme.split("```python\nimport bentoml\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "client.py"
    script.write_text("import bentoml\n" + example.replace("http://127.0.0.1:3000", server.url)
                      .replace("data/shapes/", f"{shapes_data}/").replace('"README.md"', f'"{REPO / "README.md"}"'))
    from tests.support import run_python

    result = run_python(str(script), timeout=120)
    assert result.returncode == 0 and "'label': " in result.stdout and "'error': " in result.stdout, result.stderr
