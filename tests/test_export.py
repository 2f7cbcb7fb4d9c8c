"""Export: a checked ONNX graph with a dynamic batch, Keel metadata, and proven parity."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export.onnx_export import OPSET, fold_batch_norm
from service.inference import METADATA_PREFIX, ModelInfo, OnnxClassifier, read_model_info
from service.preprocessing import PreprocessSpec
from tests.support import run_python
from training.checkpoint import FORMAT, load_checkpoint
from training.models import build_model


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
    assert metadata["precision"] == "fp32"
    assert json.loads(metadata["metrics"]) == checkpoint["metrics"]
    assert json.loads(metadata["stability"]) == checkpoint["stability"]  # the training run's stability report
    assert metadata["opset"] == str(OPSET)
    assert json.loads(metadata["exporter"])["torch"] == torch.__version__
    assert dt.datetime.fromisoformat(metadata["exported_at"]).tzinfo is not None
    info = OnnxClassifier(exported_model, device="cpu").info  # what the service and the batch job read
    assert info.precision == "fp32" and info.stability == checkpoint["stability"]


def test_model_info_writes_the_metadata_it_reads(exported_model):
    """ModelInfo is both sides of the format: what export wrote reads back into the same ModelInfo,
    which writes exactly the file's metadata again (provenance it does not interpret included)."""
    stored = {p.key: p.value for p in onnx.load(str(exported_model)).metadata_props}
    info = read_model_info(exported_model)
    assert info.to_metadata() == stored
    assert ModelInfo.from_metadata(info.to_metadata(), "round trip") == info
    assert set(info.extra) == {"model_args", "opset", "exporter"}
    made = ModelInfo(name="m", version="v", arch="alexnet_bn", labels=("a", "b"),
                     preprocessing=PreprocessSpec(resize=72, crop=64), metrics={"val_top1": 0.5},
                     precision="int8", extra={"variant": '{"of_sha256": "x"}'})
    assert ModelInfo.from_metadata(made.to_metadata(), "made") == made
    assert all(key.startswith(METADATA_PREFIX) and isinstance(value, str) for key, value in made.to_metadata().items())


def test_graph_is_folded_pinned_and_shape_checked(exported_model):
    model = onnx.load(str(exported_model))
    ops = [node.op_type for node in model.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 5  # folded into AlexNet's five convs
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == OPSET
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    dims = lambda value: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]  # noqa: E731
    (given,), (produced,) = inferred.graph.input, inferred.graph.output
    assert dims(given)[1:] == [3, 64, 64] and dims(produced)[1:] == [10]
    assert isinstance(dims(given)[0], str) and dims(given)[0] == dims(produced)[0]  # one symbolic batch dim


@pytest.mark.parametrize("arch, size", [("alexnet_bn", 64), ("inception_v1_bn", 64), ("inception_v3", 96)])
def test_batch_norm_folding_is_exact_for_every_bn_arch(arch, size):
    model = build_model(arch, num_classes=10, width=0.25)
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():  # statistics far from the initial identity, so the fold has work to do
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
    model.eval()
    folded = fold_batch_norm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is left intact
    x = torch.randn(2, 3, size, size, generator=generator)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("batch_size", [1, 2, 5, 16])
def test_batch_dimension_is_dynamic(exported_model, batch_size):
    classifier = OnnxClassifier(exported_model, device="cpu")
    batch = np.random.default_rng(batch_size).standard_normal((batch_size, 3, 64, 64), dtype=np.float32)
    probabilities = classifier.predict(batch)
    assert probabilities.shape == (batch_size, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # a row's answer does not depend on the rest of the batch
    np.testing.assert_allclose(probabilities[0], classifier.predict(batch[:1])[0], atol=1e-6)


def test_cli_exports_with_progress(trained_run, tmp_path):
    out = tmp_path / "cli" / "model.onnx"
    result = run_python("-m", "export", str(trained_run / "best.pt"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.is_file() and out.with_suffix(".parity.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.parity.json"]  # no scratch left
    assert "[1/4] rebuilding" in result.stderr and "[4/4] checking parity" in result.stderr
    assert "parity: max |dp|" in result.stderr


def _bad_checkpoints(tmp_path, trained_run):
    """name -> (checkpoint path, --out, the words the one-line error must contain)."""
    best = trained_run / "best.pt"
    checkpoint = load_checkpoint(best)
    cases = {}

    def case(name, write, expected, out=None):
        path = tmp_path / f"{name}.pt"
        if write is not None:
            write(path)
        cases[name] = (path, out or tmp_path / name / "model.onnx", expected)

    case("missing", None, "no such checkpoint file")
    case("truncated", lambda p: p.write_bytes(best.read_bytes()[:100_000]), "not a readable checkpoint")
    case("random_bytes", lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "not a readable checkpoint")
    # a foreign checkpoint: a plain state dict, as most PyTorch projects save
    case("plain_state_dict", lambda p: torch.save(checkpoint["state_dict"], p), "not a Keel checkpoint")
    case("other_format", lambda p: torch.save({**checkpoint, "format": "other/1"}, p), "not a Keel checkpoint")
    case("unknown_arch", lambda p: torch.save({**checkpoint, "arch": "resnet9000"}, p), "unknown arch 'resnet9000'")
    case("wrong_weights",
         lambda p: torch.save({**checkpoint, "model_args": {**checkpoint["model_args"], "width": 0.5}}, p),
         "size mismatch")
    not_a_folder = tmp_path / "a_file"
    not_a_folder.write_text("")
    cases["unwritable_output"] = (best, not_a_folder / "sub" / "model.onnx", "cannot write the model there")
    assert checkpoint["format"] == FORMAT
    return cases


BAD = ["missing", "truncated", "random_bytes", "plain_state_dict", "other_format", "unknown_arch", "wrong_weights",
       "unwritable_output"]


@pytest.mark.parametrize("case", BAD)
def test_cli_refuses_bad_input_with_one_line(case, trained_run, tmp_path):
    checkpoint, out, expected = _bad_checkpoints(tmp_path, trained_run)[case]
    result = run_python("-m", "export", str(checkpoint), "--out", str(out))
    assert result.returncode == 2  # unusable input, as every Keel command says it
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    named = out.parent if case == "unwritable_output" else checkpoint
    assert errors[0].startswith(f"error: {named}: ") and expected in errors[0], errors[0]
    assert not out.parent.exists()  # nothing partial left behind
