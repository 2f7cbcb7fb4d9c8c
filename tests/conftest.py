"""Session fixtures: one tiny data set, one real training run, one real export, shared by the suite.

Everything is made here, in temporary folders: no test downloads anything or needs a GPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Optional, for development only (CI leaves it unset): a folder where the data set and the tiny training
# run are kept between pytest invocations, keyed by a hash of the code that makes them.
CACHE = os.environ.get("KEEL_TEST_CACHE")
# The quick-start recipe (training/recipes/alexnet_bn.yaml) at test size: about a minute on 2 cores.
TINY_TRAINING = dict(arch="alexnet_bn", width=0.25, model_args={"dropout": 0.0}, image_size=64, resize=64,
                     epochs=12, batch_size=64, optimizer="adamw", lr=0.003, weight_decay=0.05, label_smoothing=0.0,
                     min_crop_scale=0.8, workers=0, seed=0)


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
    with open(folder.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel pytest runs wait for one maker
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_python(*args: str, env: dict | None = None, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run `python ARGS` from the repository root, as a user would from the README."""
    return subprocess.run([sys.executable, *args], cwd=REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, **kwargs)


class Server:
    """A real `bentoml serve` process on 127.0.0.1:<free port>, always stopped."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        bentoml = str(Path(sys.executable).with_name("bentoml"))
        self.process = subprocess.Popen(
            [bentoml, "serve", "service.service:Classifier", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        import urllib.request

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


@pytest.fixture(scope="session")
def server(exported_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml")
    srv = Server({"KEEL_MODEL": str(exported_model), "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"},
                 home / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


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
