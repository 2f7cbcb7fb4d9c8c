"""The service's endpoints in this process, in seconds: the whole BentoML app (middleware, request guard,
typed API methods, mounted routes) behind Starlette's test client, and the service's state built
directly. It serves the tiny model (tests/conftest.py), whose answer follows an image's mean colour:
red is "circle", green "square", blue "star". What needs a real process (sockets, worker processes,
start-up, a trained model's accuracy) is in tests/test_service*.py."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service import api
from service.config import ServiceConfig
from service.core import Keel
from service.errors import ClientError, EngineUnavailable
from service.uploads import ImageFile, InProgress, RequestGuard, read_classify
from tests.conftest import TINY_LABELS
from tests.support import multipart

COLOURS = {"circle": (250, 10, 10), "square": (10, 250, 10), "star": (10, 10, 250)}


def picture(label: str, fmt: str = "PNG", size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, COLOURS[label]).save(buffer, fmt)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that is only a header: enough for the pixel check, which must come before any decode."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"") + chunk(b"IEND", b""))


def post(client, path: str, body: bytes, content_type: str | None):
    return client.post(path, content=body, headers={"Content-Type": content_type} if content_type else {})


def labels(answer: dict) -> list[str]:
    return [p["label"] for p in answer["predictions"]]


# --- /classify -----------------------------------------------------------------------------------------------


def test_classify_takes_multipart_or_a_raw_body(service_app):
    data = picture("star")
    by_field = post(service_app, "/classify", *multipart([("image", "star.png", data)]))
    raw = post(service_app, "/classify", data, "image/png")
    for response in (by_field, raw):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["model"] == "keel-tiny" and answer["version"] == "0123456789ab"
        assert labels(answer)[0] == "star" and len(answer["predictions"]) == len(TINY_LABELS)  # top_k 5 > 4 classes
        assert set(answer["timing_ms"]) == {"preprocess", "inference", "total"}
    assert by_field.json()["predictions"] == raw.json()["predictions"]
    scores = [p["score"] for p in raw.json()["predictions"]]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize("query, fields, expected", [
    ("?top_k=2", {}, 2),
    ("", {"top_k": "2"}, 2),  # as curl sends a field
    ("", {"top_k": "2", "model": '"keel-tiny"'}, 2),  # JSON-encoded, as BentoML's clients and the Swagger UI do
    ("?top_k=3", {"top_k": "1"}, 1),  # a field wins over the query
    ("?model=keel-tiny&top_k=1", {}, 1),
    ("", {"model": "keel-tiny", "top_k": "null"}, 4),  # null: not given
])
def test_top_k_and_model_as_query_or_field(service_app, query, fields, expected):
    response = post(service_app, f"/classify{query}", *multipart([("image", "x.png", picture("circle"))], fields))
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == expected and labels(response.json())[0] == "circle"


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()[: len(buffer.getvalue()) // 3]


@pytest.mark.parametrize("name, path, body, content_type, status, message", [
    ("empty", "/classify", b"", "image/png", 400, "empty upload"),
    ("not an image", "/classify", b"this is not an image", "image/jpeg", 400, "not a recognised image format"),
    ("truncated", "/classify", truncated_jpeg(), "image/jpeg", 400, "truncated"),
    ("bomb", "/classify", png_header(10_000, 10_000), "image/png", 400, "over the limit of 40000000"),
    ("JSON", "/classify", b'{"image": "cat.jpg"}', "application/json", 415, "unsupported content type"),
    ("no content type", "/classify", b"abc", None, 415, "unsupported content type"),
    ("another field", "/classify", *multipart([("picture", "x.png", b"x")]), 400, "no file field named 'image'"),
    ("a URL for the image", "/classify", *multipart(fields={"image": "http://127.0.0.1:9/cat.jpg"}), 400,
     "URLs and other text are not fetched"),
    ("malformed multipart", "/classify", b"--b\r\n[]--b--\r\n", "multipart/form-data; boundary=b", 400, "multipart"),
    ("bad top_k", "/classify?top_k=zero", picture("star"), "image/png", 400, "top_k must be a positive integer"),
    ("top_k 0", "/classify", *multipart([("image", "x.png", b"x")], {"top_k": "0"}), 400, "top_k"),
    ("unknown model", "/classify?model=resnet", picture("star"), "image/png", 404, "unknown model 'resnet'"),
    ("batch, raw body", "/classify_batch", picture("star"), "image/png", 415, "one file part per image"),
    ("batch, no files", "/classify_batch", *multipart(fields={"note": "x"}), 400, "no file field"),
    ("batch, too many", "/classify_batch", *multipart([("images", "a.png", b"x")] * 65), 400, "at most 64"),
    ("batch, unknown model", "/classify_batch?model=nope", *multipart([("images", "a.png", b"x")]), 404,
     "unknown model 'nope'"),
    ("metadata, unknown model", "/metadata", b'{"model": "nope"}', "application/json", 404, "unknown model"),
    ("metadata, not an object", "/metadata", b"[1]", "application/json", 400, "JSON object"),
])
def test_bad_requests_get_a_4xx_json_error(service_app, name, path, body, content_type, status, message):
    response = post(service_app, path, body, content_type)
    assert response.status_code == status, (name, response.text)
    answer = response.json()
    assert list(answer) == ["error"] and message in answer["error"], (name, answer)


def test_uploads_over_the_limit_are_refused_with_413(service_app):
    limit = ServiceConfig().max_upload_bytes
    response = post(service_app, "/classify", b"\0" * (limit + 1), "image/png")
    assert response.status_code == 413 and "over the limit" in response.json()["error"]
    response = post(service_app, "/classify_batch", *multipart([("images", "big.png", b"\0" * limit)]))
    assert response.status_code == 413
    assert post(service_app, "/classify", b"\0" * 1000, "image/png").status_code == 400  # judged on its content


def test_a_batch_task_job_naming_server_files_where_uploads_belong_is_refused(service_app):
    """`POST /batch` with strings in `images` would have BentoML read those paths (or fetch those URLs)."""
    for path in ("/batch", "/batch/submit"):
        for body in ({"images": ["/etc/passwd"]}, {"images": ["http://127.0.0.1:9/x.png"]}):
            response = service_app.post(path, json=body)
            assert response.status_code == 400 and "multipart file parts" in response.json()["error"], response.text


# --- /classify_batch and /metadata ---------------------------------------------------------------------------


def test_classify_batch_answers_each_image_in_order(service_app):
    files = [("images", "red.png", picture("circle")), ("images", "notes.txt", b"not an image"),
             ("images", "blue.jpg", picture("star", "JPEG")), ("images", "empty.png", b""),
             ("other", "green.webp", picture("square", "WEBP"))]  # any field name
    response = post(service_app, "/classify_batch?top_k=1", *multipart(files))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [name for _, name, _ in files]
    assert [r["predictions"][0]["label"] if "predictions" in r else None for r in results] == [
        "circle", None, "star", None, "square"]
    assert "error" not in results[0] and "predictions" not in results[1]
    assert "not a recognised image format" in results[1]["error"] and "empty upload" in results[3]["error"]


def test_metadata_by_get_and_post(service_app):
    got = service_app.get("/metadata").json()
    assert got == service_app.post("/metadata").json() == service_app.post("/metadata", json={}).json()
    assert got["name"] == got["default_model"] == "keel-tiny" and got["labels"] == list(TINY_LABELS)
    assert got["input_size"] == [16, 16] and got["provider"] == "CPUExecutionProvider"
    assert got["models"]["keel-tiny"]["batching"]["max_batch_size"] == 32
    assert got["service"]["workers"] == 1 and got["service"]["decode"] in ("event loop", "threads")
    one = service_app.post("/metadata", json={"model": "keel-tiny"}).json()
    assert list(one["models"]) == ["keel-tiny"] and service_app.get("/metadata?model=keel-tiny").json() == one
    missing = service_app.get("/metadata?model=nope")
    assert missing.status_code == 404 and "unknown model 'nope'" in missing.json()["error"]


# --- what BentoML users expect ---------------------------------------------------------------------------------


def test_docs_json_describes_keels_endpoints(service_app):
    """The OpenAPI document (and so the Swagger UI at /) has Keel's endpoints with their request and
    response schemas: the image as a file field, top_k and model, the answers' fields."""
    document = service_app.get("/docs.json").json()
    classify = document["paths"]["/classify"]["post"]
    request_schema = classify["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert request_schema["required"] == ["image"]
    assert request_schema["properties"]["image"] == {**request_schema["properties"]["image"], "type": "string",
                                                     "format": "binary"}
    assert {"top_k", "model"} <= set(request_schema["properties"])
    answer = classify["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(answer["required"]) == {"model", "version", "predictions", "timing_ms"}
    batch = document["paths"]["/classify_batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert batch["properties"]["images"]["items"]["format"] == "binary"
    assert "/metadata" in document["paths"] and "/batch/submit" in document["paths"]
    assert service_app.get("/").status_code == 200  # the Swagger UI
    # what the guard adds: the query parameters, the raw image body, the statuses it answers
    assert [(p["name"], p["in"]) for p in classify["parameters"]] == [("top_k", "query"), ("model", "query")]
    assert set(classify["requestBody"]["content"]) == {"multipart/form-data", "image/*"}
    assert {"400", "404", "413", "415", "429", "503"} <= set(classify["responses"])
    assert classify["responses"]["503"]["headers"]["Retry-After"]
    assert document["components"]["schemas"]["Error"]["required"] == ["error"]
    assert "example" in answer and answer["example"]["predictions"][0]["label"]
    assert set(document["paths"]["/metadata"]) == {"get", "post"}


def test_bentoml_async_client_calls_the_endpoints(service_app, tmp_path):
    """BentoML's asynchronous HTTP client, as its examples use it, over the in-process app (on the app's
    own event loop, where its batchers live). tests/test_service.py drives `bentoml.SyncHTTPClient`
    against a real server."""
    from _bentoml_impl.client.http import AsyncHTTPClient  # bentoml.AsyncHTTPClient, able to take an ASGI app

    image = tmp_path / "blue.png"
    image.write_bytes(picture("star"))

    async def calls() -> None:
        async with AsyncHTTPClient("http://localhost", app=service_app.app) as client:
            answer = await client.classify(image=image, top_k=2)
            assert labels(answer)[0] == "star" and len(answer["predictions"]) == 2
            assert (await client.classify(image=image, model="keel-tiny"))["model"] == "keel-tiny"
            batch = await client.classify_batch(images=[image, Path(__file__)])
            assert "predictions" in batch["results"][0] and "error" in batch["results"][1]
            assert (await client.metadata())["name"] == "keel-tiny"
            with pytest.raises(Exception, match="unknown model"):
                await client.classify(image=image, model="nope")

    service_app.portal.call(calls)


# --- the state, directly -----------------------------------------------------------------------------------------


@pytest.fixture
def keel(tiny_model) -> Keel:
    """A worker's state, serving the tiny model (a fresh one per test: its batchers live on one event loop)."""
    keel = Keel.load(ServiceConfig(model=str(tiny_model), workers=1, cpu_threads=1, max_batch_size=4)).start()
    deadline = time.monotonic() + 30
    while not keel.ready:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return keel


def test_handlers_take_the_state_explicitly(keel):
    images = [ImageFile(f"{i}.png", picture(label)) for i, label in enumerate(["circle", "square", "star"] * 3)]

    async def calls():
        answer = await api.classify(keel, ImageFile("blue.png", picture("star")), top_k=1)
        assert answer.model == "keel-tiny" and [p.label for p in answer.predictions] == ["star"]
        # more images than one batcher batch (4 here): chunked, every answer in its place
        batch = await api.classify_batch(keel, images, top_k=1)
        assert [r.predictions[0].label for r in batch.results] == ["circle", "square", "star"] * 3
        with pytest.raises(ClientError) as unknown:
            await api.classify(keel, images[0], model="nope")
        assert unknown.value.status == 404

    asyncio.run(calls())


def test_a_lone_request_runs_at_once_and_concurrent_ones_are_batched(tiny_model):
    """Alone on its worker (as the guard counts), a request skips the batcher's wait; with company, every
    request is batched, the first one too."""
    from service.engine import batch_size_histogram

    in_progress = InProgress()
    keel = Keel.load(ServiceConfig(model=str(tiny_model), workers=1, cpu_threads=1, max_batch_size=4),
                     in_progress=in_progress).start()

    def totals() -> tuple[float, float]:
        samples = {s.name: s.value for metric in batch_size_histogram(4).collect() for s in metric.samples
                   if s.labels.get("model") == "keel-tiny"}
        return samples.get("keel_batch_size_sum", 0.0), samples.get("keel_batch_size_count", 0.0)

    async def calls() -> None:
        while not keel.ready:
            await asyncio.sleep(0.02)
        before = totals()
        in_progress.count = 1
        await api.classify(keel, ImageFile("a.png", picture("star")))  # alone: one batch of one, at once
        assert [now - then for now, then in zip(totals(), before)] == [1, 1]
        in_progress.count = 24
        answers = await asyncio.gather(*(api.classify(keel, ImageFile(f"{i}.png", picture(label)), top_k=1)
                                         for i, label in enumerate(["circle", "square", "star"] * 8)))
        assert [a.predictions[0].label for a in answers] == ["circle", "square", "star"] * 8
        images, batches = (now - then for now, then in zip(totals(), before))
        assert images == 25 and batches <= 1 + 24 / 2  # company: shared batches

    asyncio.run(calls())


def test_not_ready_is_a_503_with_retry_after(tiny_model):
    cold = Keel.load(ServiceConfig(model=str(tiny_model), workers=1))  # never started
    response = asyncio.run(api.answer(api.classify(cold, ImageFile("x.png", picture("star")))))
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert "still loading" in json.loads(response.body)["error"]
    with pytest.raises(EngineUnavailable):
        asyncio.run(api.metadata(cold))


def test_the_guard_answers_503_when_a_request_is_not_answered_in_time():
    """A body that stops arriving: the guard gives up after KEEL_REQUEST_TIMEOUT_S with 503 and Retry-After."""
    async def never_called(scope, receive, send):
        raise AssertionError("the request was passed on")

    async def stalled_body():
        await asyncio.sleep(60)

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/classify", "query_string": b"",
             "headers": [(b"content-type", b"image/png")]}
    guard = RequestGuard(never_called, {"/classify": read_classify}, ServiceConfig(request_timeout_s=0.1), 8,
                         InProgress())
    asyncio.run(guard(scope, stalled_body, send))
    assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
    assert "not answered within the timeout of 0.1 s" in json.loads(sent[1]["body"])["error"]


def test_the_guard_refuses_past_its_share_of_max_concurrency_with_429():
    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def calls() -> dict[str, list]:
        sent: dict[str, list] = {"first": [], "second": [], "probe": []}

        def call(path: str, name: str):
            scope = {"type": "http", "method": "GET", "path": path, "query_string": b"", "headers": []}
            return guard(scope, None, lambda message: asyncio.sleep(0, sent[name].append(message)))

        first = asyncio.ensure_future(call("/metadata", "first"))
        await asyncio.sleep(0.05)  # holding the only slot
        await call("/metadata", "second")
        probe = asyncio.ensure_future(call("/readyz", "probe"))  # health probes are never refused
        release.set()
        await asyncio.gather(first, probe)
        return sent

    release = asyncio.Event()
    guard = RequestGuard(slow_app, {}, ServiceConfig(), max_in_progress=1, in_progress=InProgress())
    sent = asyncio.run(calls())
    assert sent["first"][0]["status"] == sent["probe"][0]["status"] == 200
    assert sent["second"][0]["status"] == 429 and (b"retry-after", b"1") in sent["second"][0]["headers"]
    assert "KEEL_MAX_CONCURRENCY" in json.loads(sent["second"][1]["body"])["error"]


def test_batch_size_metric_buckets_cover_the_largest_batch():
    from service.engine import batch_size_histogram
    from service.inference import batch_buckets

    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48] and batch_buckets(512)[-1] == 512
    histogram = batch_size_histogram(32)  # the process's (made by the first engine here)
    assert histogram._upper_bounds[-2] >= 32  # the last finite bucket holds a full batch


def test_probabilities_answer_by_mean_colour(keel):
    """The tiny model itself, so the tests above can say what a right answer is."""
    session = keel.engine.sessions["keel-tiny"]
    from service.preprocessing import preprocess_bytes

    batch = np.stack([preprocess_bytes(picture(label), session.info.preprocessing) for label in COLOURS])
    assert [TINY_LABELS[i] for i in session.predict(batch).argmax(1)] == list(COLOURS)
