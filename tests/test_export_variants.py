"""Export variants (fp16, int8) and the model store entry, through the CLI as a user runs them."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.onnx_export import OPSET
from service.inference import METADATA_PREFIX, OnnxClassifier
from service.preprocessing import decode_image, find_images, preprocess_bytes, resize_and_crop, to_rgb
from tests.support import run_python
from training.checkpoint import load_checkpoint

STORE_FILES = {"model.onnx", "model.parity.json", "model.fp16.onnx", "model.fp16.parity.json",
               "model.int8.onnx", "model.int8.parity.json"}
UINT8_FILES = {"model.uint8-nhwc.onnx", "model.uint8-nhwc.parity.json"}  # export only: not for the store


@pytest.fixture(scope="module")
def variants(trained_run, tmp_path_factory):
    """One real CLI export with both variants, registered in a private model store."""
    folder = tmp_path_factory.mktemp("variants")
    home = folder / "bentoml"
    # The tiny test model is weak (about 0.6 test top-1 with many near-ties), so int8 moves a few
    # of the 200 test images either way; the bound here only keeps this test independent of that.
    result = run_python("-m", "export", str(trained_run / "best.pt"), "--out", str(folder / "model.onnx"),
                        "--name", "keel-test", "--fp16", "--int8", "--uint8-input", "--max-accuracy-drop", "0.1",
                        "--bentoml", "keel-variants", env={"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"})
    assert result.returncode == 0, result.stderr
    return folder, result.stderr, home


def metadata_of(path: Path) -> dict[str, str]:
    return {p.key[len(METADATA_PREFIX):]: p.value for p in onnx.load(str(path)).metadata_props}


def test_variants_are_written_with_reports_and_progress(variants):
    folder, stderr, _ = variants
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == sorted(STORE_FILES | UINT8_FILES)  # no scratch
    assert "[8/8] quantizing to int8" in stderr and "calibration images" in stderr and "[+] saving" in stderr
    for precision in ("fp16", "int8"):
        report = json.loads((folder / f"model.{precision}.parity.json").read_text())
        assert report["precision"] == precision and report["passed"] and report["reference"] == "fp32 onnx"
        test = report["test"]
        assert test["images"] == 200 and test["top1_delta"] == pytest.approx(test["top1"] - test["fp32_top1"])
        assert test["fp32_top1"] - test["top1"] <= report["max_accuracy_drop"] == 0.1
        assert report["parity"]["batch_sizes"] == [1, 3, 8] and report["parity"]["sample_source"].endswith("val")
    fp16 = json.loads((folder / "model.fp16.parity.json").read_text())
    # fp16 rounding moves probabilities by ~1e-3 at most; one near-tie among the 32 may flip
    assert fp16["parity"]["max_abs_diff"] < 5e-3 and fp16["parity"]["top1_agreement"] >= 0.95
    if fp16["provider"] == "CPUExecutionProvider":  # said honestly: not CUDA's fp16 arithmetic
        assert "casts" in fp16["note"]
    int8 = json.loads((folder / "model.int8.parity.json").read_text())
    assert int8["details"]["calibration_images"] == 256 and int8["details"]["calibration_source"].endswith("train")


def test_variants_are_self_describing_and_typed_as_claimed(variants, trained_run):
    folder = variants[0]
    fp32 = metadata_of(folder / "model.onnx")
    fp32_sha = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    for precision in ("fp16", "int8"):
        path = folder / f"model.{precision}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        metadata = metadata_of(path)
        assert metadata["precision"] == precision and metadata["version"] == f"{fp32['version']}-{precision}"
        assert json.loads(metadata["variant"])["of_sha256"] == fp32_sha
        for key in ("labels", "preprocessing", "metrics", "stability", "checkpoint_sha256", "opset", "arch"):
            assert metadata[key] == fp32[key], key
        ops = [node.op_type for node in model.graph.node]
        assert "BatchNormalization" not in ops
        assert {o.domain or "ai.onnx": o.version for o in model.opset_import} == {"ai.onnx": OPSET}
        # input and output stay float32: the service's preprocessing and post-processing are unchanged
        for value in (*model.graph.input, *model.graph.output):
            assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        weights = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in model.graph.initializer}
        if precision == "fp16":
            assert np.dtype(np.float16) in weights and ops.count("Conv") == 5
        else:
            assert np.dtype(np.int8) in weights and "QuantizeLinear" in ops
            initializers = {t.name: t for t in model.graph.initializer}
            conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
            dequantized = [n for n in model.graph.node
                           if n.op_type == "DequantizeLinear" and n.output[0] in conv_weights]
            scales = [list(initializers[n.input[1]].dims) for n in dequantized]
            assert len(scales) == 5 and all(len(s) == 1 and s[0] > 1 for s in scales)  # one scale per output channel

    labels = load_checkpoint(trained_run / "best.pt")["labels"]
    for precision in ("fp16", "int8"):  # what the service would load: batch dimension still dynamic
        classifier = OnnxClassifier(folder / f"model.{precision}.onnx", device="cpu")
        assert classifier.info.precision == precision and list(classifier.info.labels) == labels
        for batch_size in (1, 5):
            batch = np.random.default_rng(batch_size).standard_normal((batch_size, 3, 64, 64), dtype=np.float32)
            probabilities = classifier.predict(batch)
            assert probabilities.shape == (batch_size, 10) and probabilities.dtype == np.float32
            np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-3)


def test_uint8_nhwc_input_graph_normalizes_inside(variants, shapes_data):
    """The optional uint8-input graph on the crops' raw bytes answers as model.onnx does on the
    service's float preprocessing of the same images."""
    import onnxruntime as ort

    folder = variants[0]
    path = folder / "model.uint8-nhwc.onnx"
    report = json.loads((folder / "model.uint8-nhwc.parity.json").read_text())
    assert report["passed"] and report["max_abs_diff"] <= 1e-4 and report["top1_agreement"] == 1.0
    metadata = metadata_of(path)
    assert json.loads(metadata["input"]) == {"name": "image", "dtype": "uint8", "layout": "NHWC",
                                             "channel_order": "RGB", "normalization": "in graph"}
    model = onnx.load(str(path))
    assert "BatchNormalization" not in [node.op_type for node in model.graph.node]
    (given,) = model.graph.input
    assert given.name == "image" and given.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in given.type.tensor_type.shape.dim][1:] == [64, 64, 3]

    fp32 = OnnxClassifier(folder / "model.onnx", device="cpu")
    spec = fp32.info.preprocessing
    paths = find_images(shapes_data / "test")[::20]
    crops = np.stack([np.asarray(resize_and_crop(to_rgb(decode_image(p.read_bytes())), spec)) for p in paths])
    expected = fp32.predict(np.stack([preprocess_bytes(p.read_bytes(), spec) for p in paths]))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": crops})[0]
    assert crops.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_model_store_entry_holds_models_reports_and_metadata(variants, trained_run):
    folder, _, home = variants
    show = ("import json, bentoml; from service.inference import resolve_model; "
            "m = bentoml.models.get('keel-variants:latest');"
            "import os; print(json.dumps({'files': sorted(os.listdir(m.path)), 'metadata': m.info.metadata,"
            " 'labels': m.info.labels, 'path': m.path, 'resolved': str(resolve_model('keel-variants'))}))")
    result = run_python("-c", show, env={"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"})
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stdout.strip().splitlines()[-1])
    assert STORE_FILES <= set(entry["files"]) and not UINT8_FILES & set(entry["files"])
    for name in STORE_FILES:  # byte for byte what the export wrote
        assert (Path(entry["path"]) / name).read_bytes() == (folder / name).read_bytes(), name
    assert entry["resolved"] == str(Path(entry["path"]) / "model.onnx")  # the service's KEEL_MODEL=tag path
    checkpoint = load_checkpoint(trained_run / "best.pt")
    metadata = entry["metadata"]
    assert metadata["labels"] == checkpoint["labels"] and metadata["metrics"] == checkpoint["metrics"]
    assert metadata["checkpoint_sha256"] == hashlib.sha256((trained_run / "best.pt").read_bytes()).hexdigest()
    assert metadata["parity"]["passed"] and metadata["parity"]["top1_agreement"] == 1.0
    int8 = json.loads((folder / "model.int8.parity.json").read_text())
    assert metadata["variants"]["int8"]["test_top1_delta"] == pytest.approx(int8["test"]["top1_delta"])
    assert entry["labels"] == {"arch": "alexnet_bn", "project": "keel"}


def test_variant_beyond_the_accuracy_bound_is_refused(variants, trained_run, shapes_data, tmp_path):
    """A test split built from the images where int8 and fp32 disagree, labelled with fp32's answer:
    fp32 scores 100% on it and int8 0%, so the default bound must refuse the int8 model."""
    folder = variants[0]
    fp32 = OnnxClassifier(folder / "model.onnx", device="cpu")
    int8 = OnnxClassifier(folder / "model.int8.onnx", device="cpu")
    spec = fp32.info.preprocessing
    paths = find_images(shapes_data / "test")
    batch = np.stack([preprocess_bytes(p.read_bytes(), spec) for p in paths])
    expected, got = fp32.predict(batch).argmax(1), int8.predict(batch).argmax(1)
    disagree = [(p, fp32.info.labels[e]) for p, e, g in zip(paths, expected, got) if e != g]
    assert disagree, "int8 agrees with fp32 on every test image; this test needs at least one disagreement"
    split = tmp_path / "hard"
    for path, label in disagree:
        (split / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, split / label / path.name)

    out = tmp_path / "out" / "model.onnx"
    result = run_python("-m", "export", str(trained_run / "best.pt"), "--out", str(out), "--int8",
                        "--test-images", str(split))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and error[0].startswith(f"error: {out.with_name('model.int8.onnx')}: refused")
    assert "--max-accuracy-drop" in error[0] and "not written" in error[0]
    # the fp32 model passed its own checks and stays; the refused variant leaves nothing
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.parity.json"]


def test_variants_need_a_test_split(trained_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out" / "model.onnx"
    result = run_python("-m", "export", str(trained_run / "best.pt"), "--out", str(out), "--fp16",
                        "--test-images", str(empty))
    assert result.returncode == 2 and f"error: {empty}: no images" in result.stderr
    assert not out.parent.exists()  # refused before any work
