"""Export: a checked ONNX graph with a dynamic batch, Keel metadata, and proven parity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from service.inference import METADATA_PREFIX, OnnxClassifier
from service.preprocessing import PreprocessSpec
from tests.conftest import run_python
from training.checkpoint import load_checkpoint


def test_parity_report_passes_on_real_images(exported_model, shapes_data):
    report = json.loads(exported_model.with_suffix(".parity.json").read_text())
    assert report["passed"] and report["top1_agreement"] == 1.0
    assert report["max_abs_diff"] <= report["tolerance"] <= 1e-4
    assert report["sample_source"] == str(shapes_data / "val")  # real images, not noise
    assert report["batch_sizes"] == [1, 3, 8]


def test_model_is_checked_and_self_describing(exported_model, trained_run):
    model = onnx.load(str(exported_model))
    onnx.checker.check_model(model, full_check=True)
    metadata = {p.key[len(METADATA_PREFIX):]: p.value for p in model.metadata_props}
    checkpoint = load_checkpoint(trained_run / "best.pt")
    assert json.loads(metadata["labels"]) == checkpoint["labels"]
    assert PreprocessSpec.from_json(metadata["preprocessing"]) == PreprocessSpec.from_dict(checkpoint["preprocessing"])
    assert metadata["arch"] == "alexnet_bn" and metadata["name"] == "keel-test"
    assert len(metadata["checkpoint_sha256"]) == 64 and metadata["version"] == metadata["checkpoint_sha256"][:12]


@pytest.mark.parametrize("batch_size", [1, 2, 5, 16])
def test_batch_dimension_is_dynamic(exported_model, batch_size):
    classifier = OnnxClassifier(exported_model, device="cpu")
    batch = np.random.default_rng(batch_size).standard_normal((batch_size, 3, 64, 64), dtype=np.float32)
    probabilities = classifier.predict(batch)
    assert probabilities.shape == (batch_size, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # a row's answer does not depend on the rest of the batch
    np.testing.assert_allclose(probabilities[0], classifier.predict(batch[:1])[0], atol=1e-6)


def test_cli_exports_and_refuses_bad_checkpoints(trained_run, tmp_path):
    out = tmp_path / "cli" / "model.onnx"
    result = run_python("-m", "export", str(trained_run / "best.pt"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.is_file() and out.with_suffix(".parity.json").is_file()
    assert "parity" in result.stderr

    broken = tmp_path / "broken.pt"
    broken.write_bytes((trained_run / "best.pt").read_bytes()[:1000])
    refused = run_python("-m", "export", str(broken), "--out", str(tmp_path / "bad" / "model.onnx"))
    assert refused.returncode == 1
    assert str(broken) in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "bad").exists()  # nothing partial left behind
