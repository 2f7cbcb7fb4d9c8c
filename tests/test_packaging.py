"""The serving side never needs torch, and the Bento builds with the service and the model in it."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support import REPO, run_python

pytestmark = pytest.mark.slow  # an export, a Bento build


def requirement_names(text: str) -> set[str]:
    lines = (line.split("#")[0].strip().lower() for line in text.splitlines())
    return {line.split("==")[0] for line in lines if line}


def test_serving_modules_never_import_torch(exported_model):
    code = ("import sys, service.service, service.batch, service.inference, service.preprocessing; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'export', 'onnx')))")
    result = run_python("-c", code, env={"KEEL_MODEL": str(exported_model)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_serving_requirements_exclude_training_packages():
    packages = requirement_names((REPO / "requirements" / "serve.txt").read_text())
    assert packages == {"bentoml", "onnxruntime-gpu", "pillow", "numpy", "starlette", "pydantic", "prometheus-client",
                        "httptools", "uvloop"}


def test_bentoml_build_holds_service_and_model(exported_model, tmp_path):
    env = {"BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True"}
    register = ("from pathlib import Path; from export.onnx_export import save_to_bentoml; "
                f"save_to_bentoml(Path({str(exported_model)!r}), 'keel-classifier')")
    registered = run_python("-c", register, env=env)
    assert registered.returncode == 0, registered.stderr
    # KEEL_MODEL may name the model by tag: it resolves to the stored ONNX file
    resolved = run_python("-c", "from service.inference import resolve_model; print(resolve_model('keel-classifier'))",
                          env=env)
    assert resolved.returncode == 0 and resolved.stdout.strip().endswith("model.onnx"), resolved.stderr
    missing = run_python("-c", "from service.inference import resolve_model; resolve_model('no-such-model')", env=env)
    assert "neither an .onnx file nor in the BentoML model store" in missing.stderr
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    built = subprocess.run([bentoml, "build"], cwd=REPO, env={**os.environ, **env},
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    [bento_dir] = [p for p in (tmp_path / "home" / "bentos" / "keel").iterdir() if p.is_dir()]
    source = bento_dir / "src"
    assert (source / "service" / "service.py").is_file() and (source / "service" / "preprocessing.py").is_file()
    # Keel's version travels with the code, for GET /v2 (the Bento has no pyproject.toml)
    import service

    assert f'__version__ = "{service.__version__}"' in (source / "service" / "__init__.py").read_text()
    assert not (source / "training").exists() and not (source / "export").exists()
    assert "torch" not in requirement_names((bento_dir / "env" / "python" / "requirements.txt").read_text())
    # the model travels with the Bento: an exported Bento archive carries the ONNX file
    archive = tmp_path / "keel.bento"
    exported = subprocess.run([bentoml, "export", "keel:latest", str(archive)], cwd=REPO, env={**os.environ, **env},
                              capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    with tarfile.open(archive) as bundle:
        members = [os.path.normpath(name) for name in bundle.getnames()]
    assert any(name.startswith("models/keel-classifier/") and name.endswith("model.onnx") for name in members), members
