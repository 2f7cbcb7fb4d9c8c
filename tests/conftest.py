"""Session fixtures: one tiny data set, one real training run, one real export and a server for it,
shared by the suite; and a model made in milliseconds for the fast tests. Helpers: tests/support.py.

Everything is made here, in temporary folders: no test downloads anything or needs a GPU. Tests that
train, export or start servers are marked `slow`: `pytest -m "not slow"` runs the others in seconds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import REPO, Server, free_port, run_python, serve  # noqa: F401 (also imported from here)

# Optional, for development only (CI leaves it unset): a folder where the data set and the tiny training
# run are kept between pytest invocations, keyed by a hash of the code that makes them.
CACHE = os.environ.get("KEEL_TEST_CACHE")
# The quick-start recipe (training/recipes/alexnet_bn.yaml) at test size: about a minute on 2 cores. It
# trains at the data set's 64 px without EMA (the recipe: 96 px, EMA), which keeps it and the service
# tests' inference cheap.
TINY_TRAINING = dict(arch="alexnet_bn", width=0.25, model_args={"dropout": 0.0}, image_size=64, resize=64,
                     epochs=12, batch_size=64, optimizer="adamw", lr=0.003, weight_decay=0.05, label_smoothing=0.0,
                     min_crop_scale=0.8, workers=0, seed=0)


# What makes a test slow (seconds to minutes on 2 cores): the data set, the training runs, the exports
# and the servers below. A test that uses one is marked `slow` here, whether or not it says so itself.
SLOW_FIXTURES = {"shapes_data", "trained_run", "exported_model", "second_model", "server"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _cached(tmp_path_factory, name: str, sources: list[str], extra: str, make) -> Path:
    """`make(folder)` into a fresh temporary folder, or into KEEL_TEST_CACHE/<name>-<hash of sources> once."""
    if not CACHE:
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    import fcntl
    import hashlib
    import shutil

    digest = hashlib.sha256(extra.encode())
    for pattern in sources:
        for path in sorted(REPO.glob(pattern)):
            digest.update(path.read_bytes())
    folder = Path(CACHE) / f"{name}-{digest.hexdigest()[:16]}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel pytest runs of the same code wait for one maker
        if not (folder / ".done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            (folder / ".done").touch()
    return folder


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    from training.shapes import ShapesConfig, generate_dataset

    config = ShapesConfig(size=64, train_per_class=500, val_per_class=20, test_per_class=20)
    folder = _cached(tmp_path_factory, "data", ["training/shapes.py"], repr(config),
                     lambda out: generate_dataset(out / "shapes", config, progress=False))
    return folder / "shapes"


@pytest.fixture(scope="session")
def trained_run(shapes_data, tmp_path_factory) -> Path:
    from training.config import TrainConfig
    from training.train import train

    return _cached(tmp_path_factory, "run", ["training/**/*.py", "service/preprocessing.py"], repr(TINY_TRAINING),
                   lambda out: train(TrainConfig(data=str(shapes_data), out=str(out), **TINY_TRAINING)))


@pytest.fixture(scope="session")
def exported_model(trained_run, tmp_path_factory) -> Path:
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("model") / "model.onnx"
    export_checkpoint(trained_run / "best.pt", out, name="keel-test", log=lambda message: None)
    return out


@pytest.fixture(scope="session")
def server(exported_model, tmp_path_factory) -> Iterator[Server]:
    """The service as shipped (KEEL_* defaults) serving the tiny training run's model."""
    with serve(tmp_path_factory.mktemp("bentoml"), KEEL_MODEL=str(exported_model)) as srv:
        yield srv


TINY_LABELS = ("circle", "square", "star", "triangle")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A Keel model made in milliseconds, for the fast tests of everything around inference: a real
    ONNX graph with Keel's metadata (written by ModelInfo, as export writes it), run by ONNX Runtime.
    16 x 16 input; probabilities from the mean colour (global average pool, a fixed linear layer,
    softmax), so different images get different answers."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from service.inference import INPUT_NAME, OUTPUT_NAME, ModelInfo
    from service.preprocessing import PreprocessSpec

    weights = np.array([[4, -2, 0, 1], [-2, 4, 1, 0], [0, 1, 4, -2]], dtype=np.float32)  # RGB -> 4 classes
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", [INPUT_NAME], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["colour"], axis=1),
         helper.make_node("Gemm", ["colour", "weights", "bias"], ["logits"]),
         helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=-1)],
        "tiny",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", len(TINY_LABELS)])],
        [numpy_helper.from_array(weights, "weights"),
         numpy_helper.from_array(np.zeros(len(TINY_LABELS), np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    info = ModelInfo(name="keel-tiny", version="0123456789ab", arch="tiny", labels=TINY_LABELS,
                     preprocessing=PreprocessSpec(resize=16, crop=16), checkpoint_sha256="0123456789ab" + "0" * 52)
    for key, value in info.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def service_app(tiny_model, tmp_path_factory):
    """The service as `bentoml serve` assembles it (service/service.py's Classifier: middleware, guards,
    typed endpoints, mounted routes), in this process, serving `tiny_model` with one worker's settings,
    behind Starlette's test client; ready (models warm) when yielded. The module reads its settings
    from the environment when imported, so this imports it (again) with the test's."""
    import importlib
    import sys
    import time

    from starlette.testclient import TestClient

    env = {"KEEL_MODEL": str(tiny_model), "KEEL_WORKERS": "1", "KEEL_CPU_THREADS": "1",
           "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml-in-process")), "BENTOML_DO_NOT_TRACK": "True"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    with contextlib.ExitStack() as stack:
        try:
            module = importlib.reload(sys.modules["service.service"]) if "service.service" in sys.modules else \
                importlib.import_module("service.service")
            client = stack.enter_context(TestClient(module.Classifier.to_asgi()))
            deadline = time.monotonic() + 60
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the in-process service did not get ready"
                time.sleep(0.05)
        finally:  # started: the settings are read. Left in os.environ they would reach every server a
            for name, value in saved.items():  # later test starts (this fixture lives for the session)
                if value is None:
                    os.environ.pop(name)
                else:
                    os.environ[name] = value
        yield client


# A second, different model for multi-model serving: another architecture with another resize,
# so routing a request to the wrong model's preprocessing or batcher would show. Trained one epoch
# on a 10-per-class subset of `shapes_data` (accuracy does not matter, cost does: ~30 s on 2 cores).
SECOND_TRAINING = dict(arch="inception_v1_bn", width=0.25, image_size=64, resize=72, epochs=1, batch_size=32,
                       optimizer="adamw", lr=0.003, workers=0, seed=0, layer_norms_every=0)


@pytest.fixture(scope="session")
def second_model(shapes_data, tmp_path_factory) -> Path:
    """An exported inception_v1_bn ("keel-inception"), path to its .onnx file."""

    def make(out: Path) -> None:
        import shutil

        from export.onnx_export import export_checkpoint
        from training.config import TrainConfig
        from training.train import train

        subset = out / "data"
        for split, per_class in (("train", 10), ("val", 4), ("test", 2)):
            for folder in sorted((shapes_data / split).iterdir()):
                (subset / split / folder.name).mkdir(parents=True)
                for image in sorted(folder.iterdir())[:per_class]:
                    shutil.copy(image, subset / split / folder.name / image.name)
        train(TrainConfig(data=str(subset), out=str(out / "run"), **SECOND_TRAINING))
        export_checkpoint(out / "run" / "best.pt", out / "inception.onnx", name="keel-inception", log=lambda m: None)

    folder = _cached(tmp_path_factory, "second-model", ["training/**/*.py", "service/preprocessing.py", "export/*.py"],
                     repr(SECOND_TRAINING), make)
    return folder / "inception.onnx"


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    """A real Keel run of a few seconds (alexnet_bn, width 0.125, one epoch on 8 shapes per class): a
    checkpoint to start from, not a good one; nothing here needs it to be good."""
    from training.config import TrainConfig
    from training.shapes import ShapesConfig, generate_dataset
    from training.train import train

    folder = tmp_path_factory.mktemp("small-run")
    data = generate_dataset(folder / "data", ShapesConfig(size=64, train_per_class=8, val_per_class=2,
                                                          test_per_class=0), progress=False)
    train(TrainConfig(data=str(data), out=str(folder / "run"), arch="alexnet_bn", width=0.125, image_size=64,
                      resize=64, epochs=1, batch_size=16, workers=0, seed=0, layer_norms_every=0))
    return folder / "run"
