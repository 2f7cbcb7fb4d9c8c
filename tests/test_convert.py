"""training.convert: torchvision's weights -> a Keel checkpoint that export and the service take unchanged;
export without training data checks parity on synthetic images and still refuses a mismatch."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from tests.conftest import run_python
from tests.test_pretrained import torchvision_file
from training.checkpoint import load_checkpoint
from training.convert import read_labels
from training.pretrained import WeightsError

LABELS = [f"class_{i:03d}" for i in range(1000)]  # stands in for ImageNet's 1000 names


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A random torchvision GoogLeNet file as released (aux heads included), converted with the CLI."""
    folder = tmp_path_factory.mktemp("convert")
    weights = torchvision_file(folder, "googlenet", seed=3)
    labels = folder / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    out = folder / "googlenet.pt"
    result = run_python("-m", "training.convert", str(weights), "--arch", "googlenet", "--labels", str(labels),
                        "--out", str(out))
    assert result.returncode == 0, result.stderr
    return weights, labels, out, result.stderr


def test_converted_checkpoint_holds_torchvisions_tensors_labels_and_preprocessing(converted):
    weights, _, out, log = converted
    checkpoint = load_checkpoint(out)
    assert checkpoint["arch"] == "inception_v1_bn" and checkpoint["labels"] == LABELS
    assert checkpoint["model_args"] == {"num_classes": 1000, "width": 1.0, "aux_logits": False}
    spec = checkpoint["preprocessing"]
    assert (spec["crop"], spec["resize"], spec["mean"], spec["std"]) == (224, 256, (0.5,) * 3, (0.5,) * 3)
    state = torch.load(weights, weights_only=True)
    assert torch.equal(checkpoint["state_dict"]["inception4c.branch2.1.0.weight"],
                       state["inception4c.branch2.1.conv.weight"])
    assert torch.equal(checkpoint["state_dict"]["fc.weight"], state["fc.weight"])
    assert not any(name.startswith("aux") for name in checkpoint["state_dict"])
    assert checkpoint["init_from"]["source"] == "torchvision googlenet" and not checkpoint["init_from"]["reinitialised"]
    assert "dropped (not trained in torchvision's file): aux1 (10 tensors), aux2 (10 tensors)" in log


@pytest.mark.slow
def test_export_and_the_inference_core_take_a_converted_checkpoint(converted, shapes_data, tmp_path):
    from export.onnx_export import SYNTHETIC
    from service.inference import OnnxClassifier
    from service.preprocessing import preprocess_bytes

    weights, _, checkpoint, _ = converted
    model = tmp_path / "googlenet.onnx"
    result = run_python("-m", "export", str(checkpoint), "--out", str(model))
    assert result.returncode == 0, result.stderr
    assert "the checkpoint names no training data; parity runs on 32 synthetic images" in result.stderr
    report = json.loads(model.with_suffix(".parity.json").read_text())
    assert report["passed"] and report["sample_source"] == SYNTHETIC and report["top1_agreement"] == 1.0

    classifier = OnnxClassifier(model, device="cpu")
    info = classifier.info
    assert info.labels == tuple(LABELS) and info.preprocessing.mean == (0.5, 0.5, 0.5)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert info.init_from == {"file": weights.name, "sha256": digest, "source": "torchvision googlenet"}
    image = next((shapes_data / "test" / "star").iterdir()).read_bytes()
    probabilities = classifier.predict(preprocess_bytes(image, info.preprocessing)[None])
    assert probabilities.shape == (1, 1000) and np.isclose(probabilities.sum(), 1.0, atol=1e-5)

    with_images = tmp_path / "real" / "googlenet.onnx"
    result = run_python("-m", "export", str(checkpoint), "--out", str(with_images),
                        "--parity-images", str(shapes_data / "val"))
    assert result.returncode == 0, result.stderr
    assert json.loads(with_images.with_suffix(".parity.json").read_text())["sample_source"] == str(shapes_data / "val")


@pytest.mark.slow
def test_export_without_training_data_still_refuses_a_graph_that_disagrees(converted, tmp_path, monkeypatch):
    """A graph whose answers differ from PyTorch's (here: its classifier bias shifted before tracing) is
    refused on the synthetic images as it would be on real ones, and nothing is written."""
    import export.onnx_export as onnx_export

    original = onnx_export.export_graph

    def tampered(model, spec, path, *args, **kwargs):
        with torch.no_grad():
            model.fc.bias[:10] += 5.0
        return original(model, spec, path, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_graph", tampered)
    out = tmp_path / "bad" / "model.onnx"
    with pytest.raises(onnx_export.ExportError, match="ONNX Runtime disagrees with PyTorch"):
        onnx_export.export_checkpoint(converted[2], out, parity_samples=4, log=lambda message: None)
    assert not out.parent.exists()


def test_converter_refuses_what_it_cannot_convert(converted, small_run, tmp_path):
    weights, labels, _, _ = converted
    short = tmp_path / "short.txt"
    short.write_text("\n".join(LABELS[:999]))
    cases = {
        "labels_count": (weights, "googlenet", short, f"{weights}: its classifier has 1000 outputs, for 999 labels"),
        "keel_checkpoint": (small_run / "best.pt", "alexnet", labels, "a Keel checkpoint of alexnet_bn"),
        "wrong_arch": (weights, "inception_v3", labels, "looks like torchvision's googlenet"),
        "no_labels": (weights, "googlenet", tmp_path / "none.txt", "cannot read the labels"),
    }
    for name, (source, arch, label_file, expected) in cases.items():
        result = run_python("-m", "training.convert", str(source), "--arch", arch, "--labels", str(label_file),
                            "--out", str(tmp_path / f"{name}.pt"))
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode == 2 and len(errors) == 1 and expected in errors[0], (name, result.stderr)
        assert not (tmp_path / f"{name}.pt").exists()


def test_labels_files(tmp_path):
    text = tmp_path / "labels.txt"
    text.write_text("tench\n\ngoldfish\n  great white shark \n")
    assert read_labels(text) == ["tench", "goldfish", "great white shark"]
    as_json = tmp_path / "labels.json"
    as_json.write_text(json.dumps(["a", "b"]))
    assert read_labels(as_json) == ["a", "b"]
    text.write_text("a\nb\na\n")
    with pytest.raises(WeightsError, match=r"duplicate labels \['a'\]"):
        read_labels(text)
