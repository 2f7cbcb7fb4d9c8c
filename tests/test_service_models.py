"""Several images per request and several models per service, over real HTTP."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.inference import OnnxClassifier, top_k
from service.preprocessing import find_images, preprocess_bytes
from tests.support import classify_file, multipart, request, serve

pytestmark = pytest.mark.slow  # real servers, trained models


def expected(model_path, data: bytes, k: int = 5) -> list[dict]:
    """What the model answers for these bytes, computed here with the same core the service uses."""
    model = OnnxClassifier(model_path, device="cpu")
    return top_k(model.predict(preprocess_bytes(data, model.info.preprocessing)[None])[0], model.info.labels, k)


def assert_same(answer: list[dict], reference: list[dict]) -> None:
    assert [p["label"] for p in answer] == [p["label"] for p in reference]
    assert np.allclose([p["score"] for p in answer], [p["score"] for p in reference], atol=1e-4)


def test_batch_endpoint_answers_each_image_in_order(server, shapes_data, exported_model):
    paths = find_images(shapes_data / "test")[::40]  # 5 classes
    parts = [("images", path.name, path.read_bytes()) for path in paths]
    parts.insert(2, ("images", "notes.txt", b"not an image"))
    parts.insert(4, ("images", "empty.png", b""))
    status, answer = request(f"{server.url}/classify_batch?top_k=3", *multipart(parts))
    assert status == 200, answer
    assert [r["filename"] for r in answer["results"]] == [name for _, name, _ in parts]
    assert "not a recognised image format" in answer["results"][2]["error"]
    assert "empty upload" in answer["results"][4]["error"]
    good = [r for r in answer["results"] if "predictions" in r]
    assert len(good) == len(paths)
    for result, path in zip(good, paths):
        assert_same(result["predictions"], expected(exported_model, path.read_bytes(), 3))
    assert answer["model"] == "keel-test" and set(answer["timing_ms"]) == {"preprocess", "inference", "total"}


@pytest.fixture(scope="module")
def models_server(exported_model, second_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml-models")
    with serve(home, KEEL_MODELS=f"alexnet={exported_model},inception={second_model}",
               KEEL_DEFAULT_MODEL="alexnet") as srv:
        yield srv


def test_each_model_has_its_own_metadata(models_server):
    _, meta = request(f"{models_server.url}/metadata")
    assert meta["default_model"] == "alexnet" and meta["name"] == "alexnet"  # the default's fields at top level
    alexnet, inception = meta["models"]["alexnet"], meta["models"]["inception"]
    assert (alexnet["arch"], inception["arch"]) == ("alexnet_bn", "inception_v1_bn")
    assert (alexnet["preprocessing"]["resize"], inception["preprocessing"]["resize"]) == (64, 72)
    assert alexnet["version"] != inception["version"]
    assert inception["provider"] == "CPUExecutionProvider" and inception["batching"]["max_batch_size"] >= 1
    _, one = request(f"{models_server.url}/metadata?model=inception")
    assert one["name"] == "inception" and list(one["models"]) == ["inception"]
    code, answer = request(f"{models_server.url}/metadata?model=resnet")
    assert code == 404 and "unknown model 'resnet'" in answer["error"]


def test_requests_go_to_the_model_they_name(models_server, shapes_data, exported_model, second_model):
    data = find_images(shapes_data / "test")[7].read_bytes()
    status, default = classify_file(models_server.url, data)
    assert status == 200 and default["model"] == "alexnet"
    assert_same(default["predictions"], expected(exported_model, data))
    status, by_query = classify_file(models_server.url, data, "?model=inception")
    assert status == 200 and by_query["model"] == "inception"
    assert_same(by_query["predictions"], expected(second_model, data))  # its own preprocessing (resize 72)
    status, by_field = request(f"{models_server.url}/classify",
                            *multipart([("image", "x.png", data)], {"model": "inception"}))
    assert status == 200 and by_field["predictions"] == by_query["predictions"]
    code, answer = classify_file(models_server.url, data, "?model=resnet")
    assert code == 404 and "served: alexnet, inception" in answer["error"]


def test_concurrent_requests_for_two_models_are_never_mixed(models_server, shapes_data, exported_model, second_model):
    """Interleaved requests for both models, all at once: each answer is its own model's answer,
    so no batch ever ran one model's images through the other."""
    paths = find_images(shapes_data / "test")[::20]
    reference = {(model, path): expected(model_path, path.read_bytes())
                 for model, model_path in (("alexnet", exported_model), ("inception", second_model)) for path in paths}
    jobs = [(model, path) for path in paths for model in ("alexnet", "inception")] * 3
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: classify_file(models_server.url, job[1].read_bytes(), f"?model={job[0]}"),
                                jobs))
    for (model, path), (status, answer) in zip(jobs, answers):
        assert status == 200 and answer["model"] == model, answer
        assert_same(answer["predictions"], reference[(model, path)])
