"""The container image as an operator meets it: built from bentofile.yaml with podman (offline: a
local base image, no registry) and run on 127.0.0.1 the way the README says.

The first build on a machine takes a few minutes (base image, then about 2.7 GB of wheels); podman's
layer cache makes later builds take seconds, since only the last layer (code and model) changes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from service.preprocessing import find_images
from tests.support import REPO, classify_file, free_port, request, run_python
from tests.test_training import REQUIRED_TEST_ACCURACY

TOOLS = ("podman", "runc", "debootstrap")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
MISSING = [tool for tool in TOOLS if shutil.which(tool, path=SEARCH_PATH) is None]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    bool(MISSING) or os.geteuid() != 0,
    reason=(f"{', '.join(MISSING)} not installed (`make container-tools` installs them as root)" if MISSING
            else "building the base image needs root (debootstrap, rootful podman)"),
)]

IMAGE = "localhost/keel:pytest"
CONTAINERS_CONF = str(REPO / "deploy" / "containers.conf")
BUILD_TIMEOUT = 1200  # cold: base image + 2.7 GB of wheels; cached: seconds
USER_UID = 1034  # BentoML's `bentoml` user in the image
# docs/deployment.md's hardened run: read-only root filesystem (BentoML's scratch store moved to the
# tmpfs podman mounts on /tmp), no capabilities, no privilege escalation
HARDENED = ["--read-only", "--env", "BENTOML_HOME=/tmp/bentoml", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges"]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], env={**os.environ, "CONTAINERS_CONF": CONTAINERS_CONF},
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def image(exported_model, tmp_path_factory) -> str:
    """The test model in a Bento (as `make bento` does), containerized (as `make container` does)."""
    home = tmp_path_factory.mktemp("container-bentoml")
    env = {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    register = ("from pathlib import Path; from export.onnx_export import save_to_bentoml; "
                f"save_to_bentoml(Path({str(exported_model)!r}), 'keel-classifier')")
    registered = run_python("-c", register, env=env)
    assert registered.returncode == 0, registered.stderr
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    built = subprocess.run([bentoml, "build"], cwd=REPO, env={**os.environ, **env},
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    log = home / "containerize.log"
    with open(log, "w") as out:
        containerized = subprocess.run([str(REPO / "deploy" / "build-image.sh"), "keel:latest", IMAGE], cwd=REPO,
                                       env={**os.environ, **env, "BENTOML": bentoml}, stdout=out,
                                       stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT)
    assert containerized.returncode == 0, log.read_text()[-5000:]
    return IMAGE


class Container:
    """`podman run` of the image on 127.0.0.1:<free port>, in the foreground so its exit status is ours."""

    def __init__(self, image: str, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = f"keel-pytest-{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        # Host networking, with the address and port to bind given as environment variables (as
        # `--host/--port` arguments would be): the image binds what it is told, not just 0.0.0.0:3000.
        env = {"BENTOML_HOST": "127.0.0.1", "BENTOML_PORT": str(self.port), **env}
        env_args = [arg for name, value in env.items() for arg in ("--env", f"{name}={value}")]
        self.process = subprocess.Popen(
            ["podman", "run", "--rm", "--init", "--name", self.name, "--network", "host", *HARDENED, *env_args, image],
            env={**os.environ, "CONTAINERS_CONF": CONTAINERS_CONF}, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.started = time.monotonic()
        self.ready_after: float | None = None

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"container exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        self.ready_after = time.monotonic() - self.started
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"container not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-5000:]

    def stop(self, timeout: int = 30) -> int:
        """`podman stop`: SIGTERM, then SIGKILL (exit status 137) after `timeout` seconds."""
        if self.process.poll() is None:
            podman("stop", "--time", str(timeout), self.name, timeout=timeout + 60, check=False)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                podman("rm", "--force", self.name, check=False)
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def container(image, tmp_path_factory):
    # configuration reaches the service through KEEL_* variables, as in the README
    srv = Container(image, {"KEEL_TOP_K": "3"}, tmp_path_factory.mktemp("container") / "container.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
        podman("rm", "--force", "--ignore", srv.name, check=False)


def in_image(image: str, code: str) -> str:
    result = podman("run", "--rm", "--init", "--entrypoint", "python", image, "-c", code)
    return result.stdout.strip()


def test_image_holds_the_service_without_torch_or_training_code(image):
    code = ("import importlib.util as u, importlib.metadata as m, json, os; print(json.dumps({"
            "'missing': [n for n in ('torch', 'torchvision', 'training', 'export') if u.find_spec(n) is None], "
            "'src': sorted(os.listdir(os.environ['BENTO_PATH'] + '/src')), "
            "'cuda': [m.version(p) for p in ('onnxruntime-gpu', 'nvidia-cudnn-cu13', 'nvidia-cublas')]}))")
    found = json.loads(in_image(image, code))
    assert found["missing"] == ["torch", "torchvision", "training", "export"]
    assert found["src"] == ["bentofile.yaml", "service"]
    # the CUDA 13 / cuDNN 9 wheels that let the same image use a GPU host's device
    assert found["cuda"][0] == "1.31.1" and all(found["cuda"])


def test_container_runs_as_non_root_with_read_only_packages(container, image):
    """The image's user, not just the hardened flags: every process is `bentoml`, and even without
    --read-only the code it runs is not its own to change."""
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == "bentoml"
    # what deploy/kubernetes runs it as and sends traffic to (tests/test_kubernetes.py)
    from tests.test_kubernetes import IMAGE_PORT

    assert f"{IMAGE_PORT}/tcp" in config.get("ExposedPorts", {}), config.get("ExposedPorts")
    # every process in the running container, the server's workers included
    processes = [line.split() for line in podman("top", container.name, "user", "huser").stdout.splitlines()[1:]]
    assert processes and all(p == ["bentoml", str(USER_UID)] for p in processes), processes
    assert podman("exec", container.name, "id", "-u").stdout.strip() == str(USER_UID)
    # the service's user cannot change the installed packages it runs
    site = podman("exec", container.name, "python", "-c",
                  "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))")
    writable = podman("exec", container.name, "test", "-w", site.stdout.strip(), check=False)
    assert writable.returncode != 0


def test_container_classifies_test_images(container, shapes_data):
    images = find_images(shapes_data / "test")[::10]  # 20 images, every class
    correct = 0
    for path in images:
        status, answer = classify_file(container.url, path.read_bytes())
        assert status == 200, answer
        assert len(answer["predictions"]) == 3  # KEEL_TOP_K from the container's environment
        correct += answer["predictions"][0]["label"] == path.parent.name
    assert correct / len(images) >= REQUIRED_TEST_ACCURACY


def test_container_refuses_bad_uploads_with_json(container):
    code, answer = request(f"{container.url}/classify", b"this is not an image", "image/jpeg")
    assert code == 400 and "not a recognised image format" in answer["error"]
    code, answer = request(f"{container.url}/classify", b"{}", "application/json")
    assert code == 415 and "error" in answer


def test_container_reports_its_provider(container):
    with urllib.request.urlopen(container.url + "/metadata", timeout=30) as response:
        metadata = json.loads(response.read())
    # this machine has no GPU: the same image falls back to the CPU, and says so
    expected = "CUDAExecutionProvider" if Path("/dev/nvidiactl").exists() else "CPUExecutionProvider"
    assert metadata["provider"] == expected
    assert metadata["name"] == "keel-test" and len(metadata["labels"]) == 10


def test_the_doctor_runs_in_the_image(image):
    """docs/deployment.md's `python -m service.doctor` in the image: the Bento's model by its tag, the
    provider it really gets here, and every CUDA/cuDNN library the CUDA provider needs loading from the
    image's own wheels, all but the driver's libcuda, which a GPU host brings."""
    result = podman("run", "--rm", "--entrypoint", "python", "-w", "/home/bentoml/bento/src", image,
                    "-m", "service.doctor", "--json", "--seconds", "0.1", check=False, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout)
    [model] = report["models"]
    gpu = Path("/dev/nvidiactl").exists()
    assert model["model_name"] == "keel-test" and model["origin"] == "KEEL_MODEL keel-classifier:latest"
    assert model["provider"] == ("CUDAExecutionProvider" if gpu else "CPUExecutionProvider")
    missing = [lib["name"] for lib in report["cuda_libraries"]["libraries"] if not lib["loaded"]]
    assert missing == ([] if gpu else ["libcuda.so.1"]), report["cuda_libraries"]


def test_container_reports_keels_version(container):
    """GET /v2 says which Keel answers, from the code in the image (which has no pyproject.toml)."""
    import service

    assert request(f"{container.url}/v2")[1]["version"] == service.__version__


def test_container_drains_on_sigterm_under_load(image, tmp_path):
    """tests/test_drain.py's contract, for the image as Kubernetes runs it: SIGTERM under load answers
    the requests accepted, refuses new connections at once, and exits 0 within the grace period. The
    preStop hook's command (deploy/kubernetes) exists in the image."""
    from tests.test_drain import check_drain, drain_under_load

    srv = Container(image, {"KEEL_WORKERS": "2", "KEEL_CPU_THREADS": "1"}, tmp_path / "container.log")
    try:
        srv.wait_ready()
        assert podman("exec", srv.name, "sleep", "0", check=False).returncode == 0  # the preStop hook's command

        def wait_exit(timeout: float) -> int | None:
            try:
                return srv.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None

        report = drain_under_load(srv.port, lambda: podman("kill", "--signal", "TERM", srv.name), wait_exit)
        check_drain(report, srv.output())
    finally:
        srv.stop()
        podman("rm", "--force", "--ignore", srv.name, check=False)


def test_container_stops_cleanly_on_sigterm(container):
    """Last in this module: stops the shared container."""
    assert container.ready_after is not None
    code = container.stop()
    log = container.output() if not container.log.closed else container.log_path.read_text()
    assert code == 0, f"exit status {code} (137: ignored SIGTERM and was killed):\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(container.url + "/readyz", timeout=2)
