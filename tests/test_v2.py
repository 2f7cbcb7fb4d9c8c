"""The Open Inference Protocol (KServe V2) under /v2: the translation functions against tritonclient's
own request builder and response parser, then a real `bentoml serve` driven by `tritonclient.http`."""

from __future__ import annotations

import gzip
import json
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service import v2
from service.errors import ClientError
from service.inference import INPUT_NAME, OUTPUT_NAME, ModelInfo, read_model_info
from service.preprocessing import PreprocessSpec, find_images, preprocess_bytes
from tests.support import serve

LABELS = ("circle", "square", "star")
INFO = ModelInfo(name="tiny", version="abc123", arch="alexnet_bn", labels=LABELS,
                 preprocessing=PreprocessSpec(resize=4, crop=4))


def tensor(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 4, 4)).astype(np.float32)


def client_request(batch: np.ndarray, binary: bool, outputs=None, **kwargs) -> tuple[bytes, str | None]:
    """A request body exactly as tritonclient sends it, and its Inference-Header-Content-Length."""
    infer_input = triton.InferInput(INPUT_NAME, list(batch.shape), "FP32")
    infer_input.set_data_from_numpy(batch, binary_data=binary)
    body, json_size = triton.InferenceServerClient.generate_request_body([infer_input], outputs=outputs, **kwargs)
    return body, None if json_size is None else str(json_size)


@pytest.mark.parametrize("binary", [False, True])
def test_parses_tritonclient_requests_json_and_binary(binary):
    batch = tensor()
    body, header_length = client_request(batch, binary, request_id="r-1")
    parsed = v2.parse_infer_request(body, header_length, INFO)
    assert parsed.id == "r-1" and np.array_equal(parsed.batch, batch)
    # no outputs named: tritonclient asks for every output in binary
    assert parsed.outputs == (v2.RequestedOutput(OUTPUT_NAME, binary=True, classification=0),)


def test_nested_json_data_is_the_same_tensor():
    batch = tensor()
    request = {"inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": list(batch.shape), "data": batch.tolist()}]}
    parsed = v2.parse_infer_request(json.dumps(request).encode(), None, INFO)
    assert np.array_equal(parsed.batch, batch) and parsed.outputs[0].binary is False
    # as KServe's client writes it: nulls for what it leaves out
    request.update(id=None, parameters=None, outputs=None)
    request["inputs"][0]["parameters"] = None
    assert np.array_equal(v2.parse_infer_request(json.dumps(request).encode(), None, INFO).batch, batch)


PROBABILITIES = np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.2, 0.6, 0.2]], dtype=np.float32)


def round_trip(binary: bool, class_count: int = 0):
    """PROBABILITIES through build_infer_response, read back by tritonclient's own parser."""
    outputs = [triton.InferRequestedOutput(OUTPUT_NAME, binary_data=binary, class_count=class_count)]
    parsed = v2.parse_infer_request(*client_request(tensor(3), True, outputs=outputs, request_id="x"), INFO)
    body, header_length = v2.build_infer_response(parsed, INFO, PROBABILITIES)
    assert (header_length is not None) == binary
    result = triton.InferenceServerClient.parse_response_body(body, header_length=header_length)
    response = result.get_response()
    assert response["id"] == "x" and response["model_name"] == "tiny" and response["model_version"] == "abc123"
    return result.as_numpy(OUTPUT_NAME), response["outputs"][0]


@pytest.mark.parametrize("binary", [False, True])
def test_responses_read_back_with_tritonclient(binary):
    probabilities, output = round_trip(binary)
    assert output["datatype"] == "FP32" and np.array_equal(probabilities, PROBABILITIES)
    classes, output = round_trip(binary, class_count=2)
    assert output["datatype"] == "BYTES" and output["shape"] == [3, 2]
    # Triton's format, "<score>:<index>:<label>", best first; bytes when binary, str in JSON
    expected = [["0.700000:2:star", "0.200000:1:square"], ["0.500000:0:circle", "0.300000:1:square"],
                ["0.600000:1:square", "0.200000:0:circle"]]
    assert classes.tolist() == ([[s.encode() for s in row] for row in expected] if binary else expected)
    assert round_trip(binary, class_count=10)[0].shape == (3, 3)  # at most every class, as Triton


def request_with(**changes) -> dict:
    tensor_ = {"name": INPUT_NAME, "datatype": "FP32", "shape": [1, 3, 4, 4], "data": [0.5] * 48}
    request = {"inputs": [tensor_]}
    for key, value in changes.items():
        if key in ("outputs", "parameters", "id", "inputs"):
            request[key] = value
        elif value is None:
            tensor_.pop(key)
        else:
            tensor_[key] = value
    return request


@pytest.mark.parametrize("request_, message", [
    (request_with(datatype="FP64"), "must have datatype FP32, not 'FP64'"),
    (request_with(shape=[1, 3, 8, 8]), "must have shape [N, 3, 4, 4]"),
    (request_with(shape=[0, 3, 4, 4], data=[]), "N >= 1"),
    (request_with(data=[0.5] * 47), "'data' has 47 elements, shape [1, 3, 4, 4] needs 48"),
    (request_with(data=[[0.5] * 47, [0.5]]), "ragged"),
    (request_with(data=["0.5"] * 48), "only numbers"),
    (request_with(data=[True] * 48), "only numbers"),
    (request_with(data=[float("nan")] * 48), "NaN or infinite"),
    (request_with(data=None), "neither 'data' nor a binary_data_size"),
    (request_with(name="pixels"), "exactly one input, 'input'; got ['pixels']"),
    (request_with(inputs=[]), "'inputs' must be a non-empty list"),
    (request_with(outputs=[{"name": "logits"}]), "unknown output 'logits'"),
    (request_with(outputs=[{"name": OUTPUT_NAME, "parameters": {"classification": -1}}]), "classification"),
    (request_with(outputs=[{"name": OUTPUT_NAME, "parameters": {"binary_data": "yes"}}]), "'binary_data'"),
    (request_with(parameters={"shared_memory_region": "r"}, data=None), "binary_data_size"),
    (request_with(id=7), "'id' must be a string"),
    (request_with(outputs=[{"name": OUTPUT_NAME}] * 2), "requested 2 times"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_requests_get_clear_messages(request_, message):
    with pytest.raises(ClientError, match=None) as caught:
        v2.parse_infer_request(json.dumps(request_).encode(), None, INFO)
    assert message in str(caught.value) and caught.value.status == 400


def test_bad_binary_framing_gets_clear_messages():
    body, header_length = client_request(tensor(1), True)
    for length, message in [(str(len(body) + 1), "within the body"), ("x", "within the body"),
                            (str(int(header_length) + 4), "not valid JSON")]:
        with pytest.raises(ClientError, match=message):
            v2.parse_infer_request(body, length, INFO)
    with pytest.raises(ClientError, match="binary tensor data is 188 bytes"):
        v2.parse_infer_request(body[:-4], header_length, INFO)
    with pytest.raises(ClientError, match="needs the Inference-Header-Content-Length header"):
        v2.parse_infer_request(body, None, INFO)


def test_decompress_both_encodings_and_refuses_bombs():
    data = b"{}" * 1000
    assert v2.decompress(gzip.compress(data), "gzip", 10_000) == data
    assert v2.decompress(zlib.compress(data), "deflate", 10_000) == data
    with pytest.raises(ClientError) as caught:
        v2.decompress(gzip.compress(b"\0" * 1_000_000), "gzip", 10_000)
    assert caught.value.status == 413
    with pytest.raises(ClientError, match="not valid gzip"):
        v2.decompress(b"plain", "gzip", 10_000)
    with pytest.raises(ClientError) as caught:
        v2.decompress(data, "br", 10_000)
    assert caught.value.status == 415


# ----------------------------------------------------------------------------- against a real server


def classify(url: str, image: bytes, top_k: int) -> list[dict]:
    """/classify's predictions for a raw image body, what V2 is compared with."""
    request = urllib.request.Request(f"{url}/classify?top_k={top_k}", data=image, method="POST",
                                     headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["predictions"]


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60) as client_:
        yield client_


@pytest.fixture(scope="module")
def images(server, shapes_data, client) -> tuple[list[bytes], np.ndarray]:
    """Four test images and their preprocessing, done client-side from the model's V2 metadata."""
    spec = PreprocessSpec(**{key: tuple(value) if isinstance(value, list) else value for key, value in
                             client.get_model_metadata("keel-test")["parameters"]["preprocessing"].items()})
    files = [path.read_bytes() for path in find_images(shapes_data / "test")[::50][:4]]
    return files, np.stack([preprocess_bytes(data, spec) for data in files])


def test_metadata_health_and_config(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("keel-test")
    server = client.get_server_metadata()
    assert server["name"] == "keel" and {"binary_tensor_data", "classification"} <= set(server["extensions"])
    model = client.get_model_metadata("keel-test")
    size = model["parameters"]["preprocessing"]["crop"]
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, size, size]}]
    assert model["outputs"] == [{"name": "probabilities", "datatype": "FP32",
                                 "shape": [-1, len(model["parameters"]["labels"])]}]
    version = model["versions"][0]
    assert client.get_model_metadata("keel-test", model_version=version)["name"] == "keel-test"
    assert client.is_model_ready("keel-test", model_version=version)
    assert client.get_model_config("keel-test")["max_batch_size"] >= 1


@pytest.mark.parametrize("binary", [False, True])
def test_infer_agrees_with_classify(server, client, images, binary):
    files, batch = images
    infer_input = triton.InferInput("input", list(batch.shape), "FP32")
    infer_input.set_data_from_numpy(batch, binary_data=binary)
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary)]
    result = client.infer("keel-test", [infer_input], outputs=outputs, request_id=f"req-{binary}")
    probabilities = result.as_numpy("probabilities")
    labels = client.get_model_metadata("keel-test")["parameters"]["labels"]
    assert result.get_response()["id"] == f"req-{binary}" and probabilities.shape == (len(files), len(labels))
    for data, row in zip(files, probabilities):
        expected = {p["label"]: p["score"] for p in classify(server.url, data, len(labels))}
        assert np.allclose(row, [expected[label] for label in labels], atol=1e-5)


def test_classification_extension_and_compression(server, client, images):
    files, batch = images
    infer_input = triton.InferInput("input", list(batch.shape), "FP32")
    infer_input.set_data_from_numpy(batch)
    for binary in (False, True):
        result = client.infer("keel-test", [infer_input], request_compression_algorithm="gzip",
                              response_compression_algorithm="deflate",
                              outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)])
        classes = result.as_numpy("probabilities")
        assert classes.shape == (len(files), 3)
        for data, row in zip(files, classes):
            predictions = classify(server.url, data, 3)
            strings = [c.decode() if isinstance(c, bytes) else c for c in row]
            assert [s.split(":", 2)[2] for s in strings] == [p["label"] for p in predictions]
            scores = [float(s.split(":")[0]) for s in strings]
            assert scores == pytest.approx([p["score"] for p in predictions], abs=1e-5)


def infer_error(client, model: str, array: np.ndarray, datatype: str = "FP32") -> InferenceServerException:
    infer_input = triton.InferInput("input", list(array.shape), datatype)
    infer_input.set_data_from_numpy(array)
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, [infer_input])
    return caught.value


def test_bad_requests_get_4xx_json_errors(server, client, images):
    _, batch = images
    wrong_shape = infer_error(client, "keel-test", batch[:, :, 1:])
    assert wrong_shape.status() == "400" and "must have shape [N, 3," in wrong_shape.message()
    wrong_type = infer_error(client, "keel-test", batch.astype(np.float64), "FP64")
    assert wrong_type.status() == "400" and "datatype FP32, not 'FP64'" in wrong_type.message()
    unknown = infer_error(client, "no-such-model", batch)
    assert unknown.status() == "404" and "unknown model 'no-such-model'" in unknown.message()
    assert not client.is_model_ready("no-such-model")
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("keel-test", model_version="999")
    assert caught.value.status() == "404" and "no version '999'" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.get_inference_statistics("keel-test")  # not implemented: a readable 404, not a crash
    assert caught.value.status() == "404"
    # raw HTTP, as a hand-written client would get it wrong
    for body, message in [(b"not json", "not valid JSON"), (b"", "not valid JSON")]:
        request = urllib.request.Request(f"{server.url}/v2/models/keel-test/infer", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as http_error:
            urllib.request.urlopen(request, timeout=30)
        assert http_error.value.code == 400 and message in json.loads(http_error.value.read())["error"]


def test_two_models_and_readiness_before_warm_up(exported_model, tmp_path):
    """/v2/health/ready is false (400, empty body, as the protocol says) until the engine has loaded and
    warmed up, as /readyz; then each served model answers under its own name, and bodies over
    KEEL_MAX_UPLOAD_BYTES get 413. Warm-up is held 12 s longer here: a readiness probe may itself
    wait seconds for the engine and then see it ready, so the first probes must fall well inside the
    delay."""
    size = read_model_info(exported_model).preprocessing.crop
    image_bytes = 3 * size * size * 4
    with serve(tmp_path, ready=False, KEEL_MODELS=f"first={exported_model},second={exported_model}",
               KEEL_WARMUP_DELAY_S="12", KEEL_MAX_UPLOAD_BYTES=str(2 * image_bytes)) as server:
        seen, deadline = [], time.monotonic() + 120
        while seen[-1:] != [200] and time.monotonic() < deadline:
            assert server.process.poll() is None, server.output()
            try:
                with urllib.request.urlopen(f"{server.url}/v2/health/ready", timeout=10) as response:
                    assert response.read() == b""
                    seen.append(response.status)
            except urllib.error.HTTPError as not_ready:
                assert not_ready.read() == b""
                seen.append(not_ready.code)
            except OSError:  # not listening yet
                pass
            time.sleep(0.2)
        assert seen[0] == 400 and seen[-1] == 200, server.output()
        with triton.InferenceServerClient(f"127.0.0.1:{server.port}") as client:
            assert client.is_model_ready("first") and client.is_model_ready("second")
            assert [(m["name"], m["state"]) for m in client.get_model_repository_index()] == [
                ("first", "READY"), ("second", "READY")]
            batch = np.zeros((1, 3, size, size), dtype=np.float32)
            infer_input = triton.InferInput("input", list(batch.shape), "FP32")
            infer_input.set_data_from_numpy(batch)
            answers = {name: client.infer(name, [infer_input]) for name in ("first", "second")}
            assert {name: result.get_response()["model_name"] for name, result in answers.items()} == {
                "first": "first", "second": "second"}
            first, second = (answers[name].as_numpy("probabilities") for name in ("first", "second"))
            assert np.array_equal(first, second)  # one model file under two names
            unknown = infer_error(client, "keel-test", batch).message()
            assert "unknown model 'keel-test'; this server has first, second" in unknown
            too_large = infer_error(client, "first", np.zeros((3, 3, size, size), dtype=np.float32))
            assert too_large.status() == "413" and f"over the limit of {2 * image_bytes} bytes" in too_large.message()


# ----------------------------------------------------------------------------- in this process


def test_health_answers_as_the_protocol_says(service_app):
    """200 for true and a 4xx for false, with an empty body; server metadata with Keel's real version."""
    import service

    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/keel-tiny/ready"):
        response = service_app.get(path)
        assert (response.status_code, response.content) == (200, b""), path
    unknown = service_app.get("/v2/models/nope/ready")
    assert unknown.status_code == 404 and "unknown model" in unknown.json()["error"]
    assert service_app.get("/v2").json() == {"name": "keel", "version": service.__version__,
                                             "extensions": list(v2.EXTENSIONS)}


def test_not_ready_is_false_not_an_error(tiny_model):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from service.config import ServiceConfig
    from service.core import Keel

    app = Starlette(routes=v2.routes())
    app.state.keel = Keel.load(ServiceConfig(model=str(tiny_model), workers=1))  # never started
    with TestClient(app) as client:
        for path in ("/v2/health/ready", "/v2/models/keel-tiny/ready"):
            response = client.get(path)
            assert (response.status_code, response.content) == (400, b""), path
        assert client.get("/v2/health/live").status_code == 200
        answer = client.post("/v2/models/keel-tiny/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": [0.0] * 768}]})
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
