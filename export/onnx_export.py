"""Checkpoint -> verified, self-describing ONNX model. Pure functions; `export/__main__.py` is the CLI.

The exported graph takes `input` (N x 3 x crop x crop float32, N dynamic; the spatial size is
fixed by the preprocessing spec) and returns `probabilities` (N x classes, softmax included), so
every consumer, including raw Open Inference Protocol clients, gets the same numbers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from service.inference import INPUT_NAME, METADATA_PREFIX, OUTPUT_NAME, OnnxClassifier
from service.preprocessing import PreprocessSpec, find_images, preprocess_bytes
from training.checkpoint import load_checkpoint, model_from_checkpoint

OPSET = 18
# ONNX Runtime and PyTorch use different convolution kernels; in fp32 their softmax outputs agree
# to ~1e-6. 1e-4 leaves headroom without letting a wrong graph through (a wrong graph is off by >0.01).
PROBABILITY_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 3, 8)  # the batch dimension is dynamic: prove it at several sizes


class ExportError(RuntimeError):
    pass


def export_checkpoint(checkpoint_path: str | Path, out_path: str | Path, samples_dir: str | Path | None = None,
                      name: str | None = None, opset: int = OPSET, log=print) -> dict:
    """Export, check, annotate and verify; the model appears at `out_path` only if it passed."""
    checkpoint_path, out_path = Path(checkpoint_path), Path(out_path)
    checkpoint = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint)
    spec = PreprocessSpec.from_dict(checkpoint["preprocessing"])
    out_path.parent.mkdir(parents=True, exist_ok=True)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.stem}.", suffix=".onnx.tmp", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        log(f"exporting {checkpoint['arch']} ({checkpoint_path}) to ONNX opset {opset}")
        export_graph(model, spec, tmp, opset)
        metadata = build_metadata(checkpoint, checkpoint_path, name or checkpoint["arch"], opset)
        annotate(tmp, metadata)
        inputs, source = sample_inputs(checkpoint, spec, samples_dir)
        log(f"checking parity with PyTorch on {len(inputs)} samples from {source}")
        report = parity_report(model, tmp, inputs, source)
        if not report["passed"]:
            raise ExportError(
                f"ONNX Runtime disagrees with PyTorch: max |dp| {report['max_abs_diff']:.2e} "
                f"(tolerance {PROBABILITY_TOLERANCE:.0e}), top-1 agreement {report['top1_agreement']:.1%}"
            )
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    report_path = out_path.with_suffix(".parity.json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out_path} (parity: max |dp| {report['max_abs_diff']:.1e}, top-1 agreement "
        f"{report['top1_agreement']:.0%}) and {report_path.name}")
    return report


def export_graph(model: nn.Module, spec: PreprocessSpec, path: Path, opset: int = OPSET) -> None:
    """Trace `softmax(model(x))` with a dynamic batch dimension and write a checked ONNX file."""
    wrapped = nn.Sequential(model, nn.Softmax(dim=1)).eval()
    example = torch.zeros(2, 3, spec.crop, spec.crop)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed" notices are noise for us
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                wrapped, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=opset, dynamo=True, external_data=False, verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
    finally:
        exporter_log.setLevel(level)
    onnx.checker.check_model(str(path), full_check=True)


def build_metadata(checkpoint: dict, checkpoint_path: Path, name: str, opset: int) -> dict[str, str]:
    digest = sha256_of(checkpoint_path)
    return {
        "name": name,
        "version": digest[:12],  # content-addressed: the same checkpoint always exports the same version
        "arch": checkpoint["arch"],
        "model_args": json.dumps(checkpoint["model_args"]),
        "labels": json.dumps(checkpoint["labels"]),
        "preprocessing": json.dumps(checkpoint["preprocessing"], sort_keys=True),
        "metrics": json.dumps(checkpoint.get("metrics", {})),
        "checkpoint_sha256": digest,
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "exporter": f"torch {torch.__version__}, onnx {onnx.__version__}, opset {opset}",
    }


def annotate(path: Path, metadata: dict[str, str]) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=METADATA_PREFIX + key, value=value)
    model.doc_string = f"Keel image classifier {metadata['name']} ({metadata['arch']})"
    onnx.save(model, str(path))


def sample_inputs(checkpoint: dict, spec: PreprocessSpec, samples_dir=None, limit: int = 32) -> tuple[np.ndarray, str]:
    """Real images when there are any (the given folder, else the training run's validation split),
    random inputs only as a last resort. Returns the N x 3 x S x S batch and where it came from."""
    if samples_dir is None:
        data = checkpoint.get("config", {}).get("data")
        samples_dir = Path(data) / "val" if data else None
    paths = []
    if samples_dir is not None and Path(samples_dir).is_dir():
        paths = find_images(samples_dir)
        paths = paths[:: max(1, len(paths) // limit)][:limit]  # spread over the classes, not the first folder
    if paths:
        return np.stack([preprocess_bytes(p.read_bytes(), spec) for p in paths]), str(samples_dir)
    return np.random.default_rng(0).standard_normal((limit, 3, spec.crop, spec.crop), dtype=np.float32), "random inputs"


def parity_report(model: nn.Module, onnx_path: Path, inputs: np.ndarray, source: str) -> dict:
    """Compare ONNX Runtime (CPU) with PyTorch on `inputs`, run at every size in PARITY_BATCH_SIZES."""
    classifier = OnnxClassifier(onnx_path, device="cpu")
    with torch.no_grad():
        expected = torch.softmax(model.eval()(torch.from_numpy(inputs)), dim=1).numpy()
    worst, agreement = 0.0, 1.0
    for batch_size in PARITY_BATCH_SIZES:
        got = np.concatenate([classifier.predict(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])
        worst = max(worst, float(np.abs(got - expected).max()))
        agreement = min(agreement, float((got.argmax(1) == expected.argmax(1)).mean()))
    return {
        "samples": len(inputs),
        "sample_source": source,
        "batch_sizes": list(PARITY_BATCH_SIZES),
        "max_abs_diff": worst,
        "tolerance": PROBABILITY_TOLERANCE,
        "top1_agreement": agreement,
        "passed": worst <= PROBABILITY_TOLERANCE and agreement == 1.0,
        "provider": classifier.provider,
    }


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_to_bentoml(onnx_path: Path, name: str, log=print) -> str:
    """Copy the model (and its parity report) into the BentoML model store; returns the tag."""
    import bentoml

    classifier = OnnxClassifier(onnx_path, device="cpu")
    info = classifier.info
    with bentoml.models.create(
        name,
        labels={"arch": info.arch, "project": "keel"},
        metadata={"labels": list(info.labels), "metrics": info.metrics, "checkpoint_sha256": info.checkpoint_sha256,
                  "version": info.version},
    ) as model_ref:
        for source in (onnx_path, onnx_path.with_suffix(".parity.json")):
            if source.exists():
                target = "model.onnx" if source == onnx_path else "parity.json"
                Path(model_ref.path_of(target)).write_bytes(source.read_bytes())
    log(f"saved to the BentoML model store as {model_ref.tag}")
    return str(model_ref.tag)
