"""`python -m service.doctor`: what really runs where, on this CPU machine (onnxruntime-gpu, no GPU),
with the built-in graph and with real exported models, in-process and as a command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service import doctor
from service.inference import CPU, CUDA, OnnxClassifier, gpu_visible
from tests.conftest import REPO, run_python

NO_GPU = pytest.mark.skipif(gpu_visible(), reason="this machine shows a GPU; these tests are about one without")
PROVIDER_LIBRARY = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"


@pytest.fixture
def no_keel_env(monkeypatch):
    for name in ("KEEL_MODEL", "KEEL_MODELS", "KEEL_DEVICE", "KEEL_DEFAULT_MODEL", "BENTO_PATH"):
        monkeypatch.delenv(name, raising=False)


def test_the_builtin_graph_is_valid_onnx_and_computes_what_it_says(tmp_path):
    """Hand-encoded protobuf (the serving side has no onnx package): ONNX's own checker accepts it and
    ONNX's reference evaluator agrees with ONNX Runtime on it."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    path = doctor.builtin_graph(tmp_path / "graph.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm", "Softmax"]
    classifier = OnnxClassifier(path, device="cpu")
    assert classifier.info.name == doctor.BUILTIN_NAME and len(classifier.info.labels) == 10
    batch = np.random.default_rng(1).standard_normal((5, 3, 64, 64)).astype(np.float32)
    batch += np.arange(-2, 3, dtype=np.float32)[:, None, None, None]  # images of different brightness
    got = classifier.predict(batch)
    expected = ReferenceEvaluator(model).run(None, {"input": batch})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-5)
    assert np.abs(got[0] - got[-1]).max() > 0.01  # not a constant answer


@pytest.mark.skipif(not PROVIDER_LIBRARY.is_file(), reason="onnxruntime without its CUDA provider library")
def test_the_cuda_provider_library_names_the_libraries_it_needs():
    needed = doctor.elf_needed(PROVIDER_LIBRARY)
    assert {"libcublasLt.so.13", "libcublas.so.13", "libcudart.so.13", "libcuda.so.1"} <= set(needed)
    assert "libc.so.6" in needed
    with pytest.raises(ValueError, match="not a 64-bit little-endian ELF"):
        doctor.elf_needed(Path(doctor.__file__))


@NO_GPU
def test_on_this_cpu_machine_it_serves_on_the_cpu_and_says_why_not_cuda(no_keel_env, capsys):
    assert doctor.main(["--json", "--seconds", "0.05"]) == 0
    report = json.loads(capsys.readouterr().out)  # stdout holds the JSON and nothing else
    runtime = report["onnxruntime"]
    assert runtime["version"] == ort.__version__ and runtime["package"] == "onnxruntime-gpu"
    assert CUDA in runtime["providers"] and CPU in runtime["providers"]  # offered, though unusable here
    assert report["gpu"]["visible"] is False and report["gpu"]["device_nodes"] == []
    assert not report["cuda_driver"]["loaded"] and "libcuda.so.1" in report["cuda_driver"]["error"]
    libraries = {lib["name"]: lib for lib in report["cuda_libraries"]["libraries"]}
    assert {"libcudart.so.13", "libcublas.so.13", "libcudnn.so.9"} <= set(libraries)
    assert all(lib["path"] for lib in libraries.values() if lib["loaded"])
    assert not report["cuda_libraries"]["provider_library_loads"]["loaded"]
    assert report["cuda_blockers"][0].startswith("no GPU is visible")
    [model] = report["models"]
    assert model["name"] == doctor.BUILTIN_NAME and "built-in" in model["origin"]
    assert model["provider"] == CPU and model["providers"] == [CPU] and model["finite"]
    assert list(model["warmup_ms"]) == ["1", "8", "32"]
    assert [t["batch_size"] for t in model["throughput"]] == [1, 8, 32]
    assert all(t["images_per_s"] > 0 and t["calls"] >= 3 for t in model["throughput"])
    assert report["exit_status"] == 0 and report["verdict"].startswith("OK: serving on the CPU: no GPU is visible")


@NO_GPU
def test_keel_device_cuda_without_a_usable_gpu_exits_2_with_the_reason(exported_model):
    result = run_python("-m", "service.doctor", env={"KEEL_DEVICE": "cuda", "KEEL_MODEL": str(exported_model)})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unusable: KEEL_DEVICE=cuda but CUDA cannot be used: no GPU is visible" in result.stdout
    assert "why not CUDA" in result.stdout and "libcudnn.so.9" in result.stdout
    assert "sessions        not started" in result.stdout  # as the service, which refuses before loading models


def test_it_checks_the_models_the_service_would_serve(exported_model, tmp_path):
    """KEEL_MODELS as the service reads it, and readable output; the serving side's rule holds: no torch."""
    code = ("import sys; from service.doctor import main; status = main(['--seconds', '0.05']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'export', 'onnx'))); "
            "sys.exit(status)")
    result = run_python("-c", code, env={"KEEL_MODELS": f"first={exported_model},second={exported_model}",
                                         "KEEL_DEVICE": "cpu"})
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    assert text.rstrip().endswith("[]")  # nothing from torch, training, export or onnx was imported
    assert text.count("keel-test (alexnet_bn, fp32)") == 2
    assert "first: KEEL_MODELS first=" in text and "second: KEEL_MODELS second=" in text
    assert "session         CPUExecutionProvider (asked for CPUExecutionProvider)" in text
    assert "throughput      batch 1:" in text and "OK: KEEL_DEVICE=cpu" in text


@pytest.mark.parametrize("env, message", [
    ({"KEEL_DEVICE": "gpu"}, "KEEL_DEVICE must be one of auto, cpu, cuda, not 'gpu'"),
    ({"KEEL_MAX_BATCH_SIZE": "0"}, "KEEL_MAX_BATCH_SIZE must be positive"),
    ({"KEEL_MODEL": "/nowhere/model.onnx"}, "/nowhere/model.onnx: no such model file"),
    ({"KEEL_MODELS": "a=x.onnx,a=y.onnx"}, "KEEL_MODELS names 'a' twice"),
])
def test_unusable_settings_exit_2_naming_the_problem(env, message, monkeypatch, capsys, no_keel_env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert doctor.main(["--seconds", "0.05"]) == 2
    assert f"unusable: {message}" in capsys.readouterr().out


def report_with(device: str, visible: bool, providers: list[str], blockers: list[str]) -> dict:
    return {"device": device, "cuda_blockers": blockers, "gpu": {"visible": visible},
            "onnxruntime": {"providers": [CUDA, CPU]},
            "models": [{"name": f"m{i}", "provider": p, "finite": p != "NaN"} for i, p in enumerate(providers)]}


@pytest.mark.parametrize("device, visible, providers, blockers, status, verdict", [
    ("auto", True, [CUDA], [], 0, "OK: serving on the GPU: CUDAExecutionProvider"),
    ("auto", True, [CPU], ["libcudnn.so.9 cannot be loaded"], 1, "fell back to the CPU, as the service would"),
    ("auto", False, [CPU], ["no GPU is visible"], 0, "OK: serving on the CPU: no GPU is visible"),
    ("cuda", True, [CUDA, CUDA], [], 0, "OK: KEEL_DEVICE=cuda and every session runs on CUDAExecutionProvider"),
    ("cuda", True, [], ["a", "b"], 2, "CUDA cannot be used: a (and 1 more"),
    ("cpu", True, [CPU], [], 0, "OK: KEEL_DEVICE=cpu"),
    ("auto", True, [CUDA, "NaN"], [], 2, "unusable: m1 answers with non-finite probabilities here"),
])
def test_the_verdict_and_exit_status(device, visible, providers, blockers, status, verdict):
    code, text = doctor.diagnose(report_with(device, visible, providers, blockers))
    assert code == status and verdict in text


@pytest.mark.slow
def test_inside_a_bento_it_reads_the_model_from_the_bentos_own_store(exported_model, tmp_path):
    """What `python -m service.doctor` meets in the container image: KEEL_MODEL=keel-classifier:latest (the
    Bento's setting), BENTO_PATH set and an empty BENTOML_HOME. It must find the model in the Bento, as
    `bentoml serve` does; docs/deployment.md's command, without podman."""
    import os
    import subprocess
    import sys
    import tarfile

    home = {"BENTOML_HOME": str(tmp_path / "build-home"), "BENTOML_DO_NOT_TRACK": "True"}
    register = ("from pathlib import Path; from export.onnx_export import save_to_bentoml; "
                f"save_to_bentoml(Path({str(exported_model)!r}), 'keel-classifier')")
    assert run_python("-c", register, env=home).returncode == 0
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    built = subprocess.run([bentoml, "build"], cwd=REPO, env={**os.environ, **home}, capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    # the Bento as an image holds it: exported with its models (a Bento in the local store only refers to them)
    archive = tmp_path / "keel.bento"
    exported = subprocess.run([bentoml, "export", "keel:latest", str(archive)], cwd=REPO,
                              env={**os.environ, **home}, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    bento = tmp_path / "bento"
    with tarfile.open(archive) as bundle:
        bundle.extractall(bento, filter="data")
    image_env = {"KEEL_MODEL": "keel-classifier:latest", "BENTOML_HOME": str(tmp_path / "image-home"),
                 "BENTO_PATH": str(bento), "KEEL_DEVICE": "cpu"}
    result = run_python("-m", "service.doctor", "--json", "--seconds", "0.05", env=image_env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [model] = json.loads(result.stdout)["models"]
    assert model["model_name"] == "keel-test" and model["origin"] == "KEEL_MODEL keel-classifier:latest"
    assert Path(model["path"]).is_relative_to(bento / "models")
    outside = run_python("-m", "service.doctor", env={**image_env, "BENTO_PATH": ""})
    assert outside.returncode == 2 and "neither an .onnx file nor in the BentoML model store" in outside.stdout
