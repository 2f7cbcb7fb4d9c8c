"""Checkpoint -> verified, self-describing ONNX models. Pure functions; `export/__main__.py` is the CLI.

The exported graph takes `input` (N x 3 x crop x crop float32, N dynamic; the spatial size is
fixed by the preprocessing spec, because the exporter silently mis-handles dynamic H/W for these
models) and returns `probabilities` (N x classes, softmax included), so every consumer, including
raw Open Inference Protocol clients, gets the same numbers. Batch norm is folded into the convs
in PyTorch before export, so the graph has no BatchNormalization node.

Variants are made from the verified fp32 graph and written beside it:
  `model.fp16.onnx`  float16 weights and arithmetic for the CUDA provider; input/output stay float32
  `model.int8.onnx`  static QDQ quantization (per-channel int8 weights, uint8 activations) for the CPU
Each is checked like the fp32 model, compared with it on the parity images and on the test split,
and refused (not written) if its test top-1 accuracy drops by more than `max_accuracy_drop`.

Every file appears only after it passed: all work happens in a scratch folder inside the output
folder, and finished files are renamed into place.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from service.inference import INPUT_NAME, METADATA_PREFIX, OUTPUT_NAME, ModelInfo, OnnxClassifier
from service.preprocessing import ImageDecodeError, PreprocessSpec, find_images, preprocess, preprocess_bytes
from service.progress import Progress
from training.checkpoint import load_checkpoint, model_from_checkpoint

OPSET = 18  # pinned: recorded as keel.opset and checked in every written graph
# ONNX Runtime and PyTorch use different convolution kernels; in fp32 their softmax outputs agree
# to ~1e-6. 1e-4 leaves headroom without letting a wrong graph through (a wrong graph is off by >0.01).
PROBABILITY_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 3, 8)  # the batch dimension is dynamic: prove it at several sizes
PRECISIONS = ("fp32", "fp16", "int8")
# The optional uint8-input variant (`<out>.uint8-nhwc.onnx`): input `image`, N x crop x crop x 3 uint8
# RGB (the centre crop as Pillow gives it); cast, normalize and transpose happen in the graph.
UINT8_NHWC = "uint8-nhwc"
UINT8_INPUT_NAME = "image"

Log = Callable[[str], None]


@dataclass(frozen=True)
class ExportConfig:
    name: str | None = None  # model name recorded in the metadata; None: the arch
    samples: str | None = None  # parity images (a folder); None: the training data's val/ split, else synthetic
    parity_samples: int = 32  # parity images used, spread over the folder's classes
    fp16: bool = False  # also write <out>.fp16.onnx (for the CUDA provider)
    int8: bool = False  # also write <out>.int8.onnx (static QDQ quantization, for the CPU)
    uint8_input: bool = False  # also write <out>.uint8-nhwc.onnx (uint8 NHWC input; the service cannot load it yet)
    test_images: str | None = None  # labelled ImageFolder split for variants' accuracy; None: the training data's test/
    calibration_images: str | None = None  # int8 calibration images; None: the training data's train/ split
    calibration_count: int = 256  # calibration images used, spread over the classes
    # A variant whose test top-1 accuracy is more than this below the fp32 model's (absolute: 0.01 is
    # one percentage point) is refused. fp16 and int8 usually move it by well under half a point.
    max_accuracy_drop: float = 0.01

    def __post_init__(self):
        if not 0 <= self.max_accuracy_drop <= 1:
            raise ValueError(f"max_accuracy_drop must be within [0, 1], not {self.max_accuracy_drop}")
        if self.parity_samples < 1 or self.calibration_count < 1:
            raise ValueError("parity_samples and calibration_count must be at least 1")

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(p for p, wanted in (("fp16", self.fp16), ("int8", self.int8)) if wanted)


class ExportError(RuntimeError):
    """Export could not start from what it was given (a checkpoint, image folder or output folder it
    cannot use); the message names the file concerned. `python -m export` exits 2."""


class ExportRefused(ExportError):
    """Export ran, and refused a model it made: it failed a check (graph, parity, accuracy). Nothing of
    it is written; `python -m export` exits 1."""


def variant_path(out_path: str | Path, precision: str) -> Path:
    """`model.onnx` -> `model.int8.onnx`; the fp32 model is `out_path` itself."""
    out_path = Path(out_path)
    return out_path if precision == "fp32" else out_path.with_name(f"{out_path.stem}.{precision}{out_path.suffix}")


def report_path(model_path: str | Path) -> Path:
    """`model.int8.onnx` -> `model.int8.parity.json`."""
    return Path(model_path).with_suffix(".parity.json")


def export_checkpoint(checkpoint_path: str | Path, out_path: str | Path, config: ExportConfig | None = None,
                      log: Log = print, **fields) -> dict[str, dict]:
    """Export, check, annotate and verify the fp32 model, then the variants `config` asks for.

    `fields` override `config`'s (e.g. `name="x"`). Returns the parity reports by precision.
    A refused variant raises ExportError after the files that passed were written.
    """
    config = dataclasses.replace(config or ExportConfig(), **fields)
    checkpoint_path, out_path = Path(checkpoint_path), Path(out_path)
    steps = Steps(log, 4 + (1 if config.variants else 0) + len(config.variants) + config.uint8_input)

    steps.next(f"rebuilding the model from {checkpoint_path}")
    checkpoint = load_checkpoint(checkpoint_path)
    model = rebuild(checkpoint, checkpoint_path)
    spec = PreprocessSpec.from_dict(checkpoint["preprocessing"])
    data_root = checkpoint.get("config", {}).get("data")
    # Resolve every input folder before the slow work, so a wrong path fails in seconds.
    samples_dir = Path(config.samples) if config.samples else (Path(data_root) / "val" if data_root else None)
    if config.samples and not find_images(samples_dir):
        raise ExportError(f"{samples_dir}: no images for the parity check")
    test_dir = calibration_dir = None
    if config.variants:
        test_dir = split_dir(config.test_images, data_root, "test", "--test-images")
    if config.int8:
        calibration_dir = split_dir(config.calibration_images, data_root, "train", "--calibration-images")

    with output_folder(out_path.parent) as scratch:
        steps.next(f"exporting {checkpoint['arch']} to ONNX opset {OPSET} (batch norm folded into the convs)")
        folded = fold_batch_norm(model)
        fp32 = scratch / out_path.name
        export_graph(folded, spec, fp32)
        info = describe(checkpoint, checkpoint_path, config.name or checkpoint["arch"])
        annotate(fp32, info)

        steps.next("checking the graph (onnx.checker, shape inference, opset, no batch norm)")
        check_graph(fp32, spec, len(checkpoint["labels"]))

        steps.next(f"checking parity with PyTorch at batch sizes {', '.join(map(str, PARITY_BATCH_SIZES))}")
        inputs, source = sample_inputs(spec, samples_dir, config.parity_samples, log)
        report = parity_report(model, fp32, inputs, source)
        if not report["passed"]:
            raise ExportRefused(
                f"{out_path}: ONNX Runtime disagrees with PyTorch: max |dp| {report['max_abs_diff']:.2e} "
                f"(tolerance {PROBABILITY_TOLERANCE:.0e}), top-1 agreement {report['top1_agreement']:.1%}; not written"
            )
        publish(fp32, out_path, report)
        log(f"wrote {out_path} (parity: max |dp| {report['max_abs_diff']:.1e}, top-1 agreement "
            f"{report['top1_agreement']:.0%}) and {report_path(out_path).name}")
        reports = {"fp32": report}
        warn_stale_variants(out_path, info.checkpoint_sha256, config.variants, log)
        if config.uint8_input:
            steps.next("exporting the uint8 NHWC-input variant (cast, normalize, transpose in the graph)")
            reports[UINT8_NHWC] = export_uint8_input(folded, spec, out_path, scratch, info, samples_dir, log)
        if not config.variants:
            return reports

        steps.next(f"measuring the fp32 model's top-1 on {test_dir}")
        test_x, test_y = labelled_images(test_dir, checkpoint["labels"], spec)
        reference = Reference(OnnxClassifier(out_path, device="cpu"), inputs, source, test_x, test_y, str(test_dir))
        log(f"fp32 test top-1 {reference.test_top1:.2%} on {len(test_y)} images")
        refused = []
        for precision in config.variants:
            target = variant_path(out_path, precision)
            candidate = scratch / target.name
            if precision == "fp16":
                steps.next("converting to fp16 (input and output stay float32) and verifying")
                details = convert_fp16(out_path, candidate)
            else:
                steps.next(f"quantizing to int8 (static QDQ, per-channel; calibration on {calibration_dir})")
                details = quantize_int8(out_path, candidate, calibration_dir, spec, config.calibration_count,
                                        scratch, log)
            annotate(candidate, variant_info(info, precision, sha256_of(out_path), details))
            check_graph(candidate, spec, len(checkpoint["labels"]))
            variant_report = compare_variant(reference, candidate, precision, config.max_accuracy_drop)
            variant_report.update(details=details)
            reports[precision] = variant_report
            test = variant_report["test"]
            summary = (f"test top-1 {test['top1']:.2%} vs fp32 {test['fp32_top1']:.2%} "
                       f"({100 * test['top1_delta']:+.1f} points), "
                       f"max |dp| {variant_report['parity']['max_abs_diff']:.1e}, "
                       f"top-1 agreement {variant_report['parity']['top1_agreement']:.1%} "
                       f"on {variant_report['provider']}")
            if not variant_report["passed"]:
                refused.append(f"{target}: refused, {summary}: accuracy drop above the bound of "
                               f"{100 * config.max_accuracy_drop:.1f} points (--max-accuracy-drop); not written")
                continue
            publish(candidate, target, variant_report)
            log(f"wrote {target} ({summary}) and {report_path(target).name}")
            if variant_report.get("note"):
                log(f"note: {variant_report['note']}")
        if refused:
            raise ExportRefused("; ".join(refused))
    return reports


def warn_stale_variants(out_path: Path, checkpoint_sha256: str, written: tuple[str, ...], log: Log) -> None:
    """Variant files left beside the new model by an export of another checkpoint are not ours to
    delete, but nobody should mistake them for variants of this one (`--bentoml` skips them too)."""
    for precision in PRECISIONS[1:]:
        path = variant_path(out_path, precision)
        if precision in written or not path.is_file():
            continue
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if props.get(METADATA_PREFIX + "checkpoint_sha256") != checkpoint_sha256:
            log(f"warning: {path} is from another checkpoint; re-export with --{precision} or remove it")


class Steps:
    """`[2/5] exporting ...` lines: where a long export is, and how much is left."""

    def __init__(self, log: Log, total: int):
        self.log, self.total, self.done = log, total, 0

    def next(self, message: str) -> None:
        self.done += 1
        self.log(f"[{self.done}/{self.total}] {message}")


def rebuild(checkpoint: dict, checkpoint_path: Path) -> nn.Module:
    """The checkpoint's model in eval mode, or an ExportError naming the file."""
    try:
        model = model_from_checkpoint(checkpoint)
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        # load_state_dict puts the useful part ("size mismatch for ...") on the lines after the first
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
        reason = " ".join(lines[:2])[:300]
        raise ExportError(f"{checkpoint_path}: cannot rebuild the model "
                          f"({checkpoint.get('arch')!r}): {reason}") from None
    # A checkpoint with non-finite weights or batch-norm statistics (training never promotes one to
    # best.pt, but last.pt can be one) would export a model that answers NaN.
    if not all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()):
        raise ExportError(f"{checkpoint_path}: the checkpoint holds non-finite weights or batch-norm statistics")
    return model


def split_dir(given: str | None, data_root: str | None, split: str, option: str) -> Path:
    """A labelled image folder the user named, else the training data's `split`, which must have images."""
    folder = Path(given) if given else (Path(data_root) / split if data_root else None)
    if folder is None or not find_images(folder):
        where = folder or f"the checkpoint's training data ({split}/)"
        raise ExportError(f"{where}: no images for the variant check; pass {option} DIR (an ImageFolder split)")
    return folder


class output_folder:
    """Create the output folder (remembering what we created) and a scratch folder inside it.

    On any failure, the scratch folder and every folder we created are removed again, so a failed
    export leaves the disk as it was.
    """

    def __init__(self, folder: Path):
        self.folder, self.created, self.scratch = folder, [], None

    def __enter__(self) -> Path:
        missing = []
        for parent in [self.folder, *self.folder.parents]:
            if parent.exists():
                break
            missing.append(parent)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.created = missing
            self.scratch = Path(tempfile.mkdtemp(prefix=".keel-export-", dir=self.folder))
        except OSError as exc:
            self._cleanup()
            raise ExportError(f"{self.folder}: cannot write the model there ({exc.strerror or exc})") from None
        return self.scratch

    def __exit__(self, kind, value, traceback) -> None:
        self._cleanup(remove_folders=kind is not None)

    def _cleanup(self, remove_folders: bool = True) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        if remove_folders:
            for folder in self.created:  # deepest first; rmdir keeps a folder that holds a published file
                try:
                    folder.rmdir()
                except OSError:
                    break


def publish(model_path: Path, target: Path, report: dict) -> None:
    """Move a verified model and its report into place (same file system: each rename is atomic)."""
    report_tmp = model_path.with_suffix(".parity.json")
    report_tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(model_path, target)
    os.replace(report_tmp, report_path(target))


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode) with every Conv2d -> BatchNorm2d pair folded into one Conv2d.

    Inference with running statistics is an affine map per channel, so it folds exactly into the
    conv's weights and bias: one fewer pass over every activation. Every BN in Keel's models sits
    right after a conv inside `ConvBNReLU` (an nn.Sequential); a BN anywhere else would stay and
    make `check_graph` fail, so a new architecture cannot silently ship unfolded.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                module._modules[second] = nn.Identity()
    return folded


def export_graph(model: nn.Module, spec: PreprocessSpec, path: Path, opset: int = OPSET,
                 uint8_nhwc: bool = False) -> None:
    """Trace `softmax(model(x))` with a dynamic batch dimension and write it to `path`
    (with `uint8_nhwc`: `softmax(model(normalize(x)))` for uint8 N x S x S x 3 input `image`)."""
    if uint8_nhwc:
        wrapped = nn.Sequential(Uint8NHWCInput(spec), model, nn.Softmax(dim=1)).eval()
        example = torch.zeros(2, spec.crop, spec.crop, 3, dtype=torch.uint8)
    else:
        wrapped = nn.Sequential(model, nn.Softmax(dim=1)).eval()
        example = torch.zeros(2, 3, spec.crop, spec.crop)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed" notices are noise for us
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                wrapped, (example,), str(path), input_names=[UINT8_INPUT_NAME if uint8_nhwc else INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset, dynamo=True, external_data=False, verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
    finally:
        exporter_log.setLevel(level)


class Uint8NHWCInput(nn.Module):
    """uint8 RGB crops, N x S x S x 3 -> the normalized N x 3 x S x S float input (what
    `service.preprocessing.normalize` does in numpy), inside the graph: the client sends a quarter
    of the bytes and skips a float pass over every pixel."""

    def __init__(self, spec: PreprocessSpec):
        super().__init__()
        mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
        # (x / 255 - mean) / std as one multiply-add per channel; last axis is the channel in NHWC
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) * self.scale + self.shift).permute(0, 3, 1, 2)


def check_graph(path: Path, spec: PreprocessSpec, classes: int, opset: int = OPSET, uint8_nhwc: bool = False) -> None:
    """onnx.checker (full), strict typed shape inference, and the contract the service relies on:
    input N x 3 x crop x crop float32 (N x crop x crop x 3 uint8 `image` for the uint8 variant) and
    output N x classes float32 with the same symbolic N, the pinned opset, and no BatchNormalization left."""
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportRefused(f"{path.name}: the ONNX graph is invalid: {str(exc).strip().splitlines()[0]}") from None

    def signature(values, name):
        match = [v for v in values if v.name == name]
        if len(match) != 1:
            raise ExportRefused(f"{path.name}: the graph has no {name!r} tensor")
        tensor = match[0].type.tensor_type
        return tensor.elem_type, [d.dim_param or d.dim_value for d in tensor.shape.dim]

    in_type, in_dims = signature(inferred.graph.input, UINT8_INPUT_NAME if uint8_nhwc else INPUT_NAME)
    out_type, out_dims = signature(inferred.graph.output, OUTPUT_NAME)
    batch = in_dims[0] if in_dims else None
    expected_in = [batch, spec.crop, spec.crop, 3] if uint8_nhwc else [batch, 3, spec.crop, spec.crop]
    expected_type = onnx.TensorProto.UINT8 if uint8_nhwc else onnx.TensorProto.FLOAT
    if not isinstance(batch, str) or in_dims != expected_in or out_dims != [batch, classes] \
            or in_type != expected_type or out_type != onnx.TensorProto.FLOAT:
        expected = (f"uint8 [N, {spec.crop}, {spec.crop}, 3]" if uint8_nhwc
                    else f"float32 [N, 3, {spec.crop}, {spec.crop}]")
        raise ExportRefused(f"{path.name}: graph signature is input {in_dims} -> output {out_dims}, "
                          f"expected {expected} -> float32 [N, {classes}] with N dynamic")
    versions = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if versions.get("ai.onnx") != opset:
        raise ExportRefused(f"{path.name}: graph uses ONNX opset {versions.get('ai.onnx')}, pinned is {opset}")
    batch_norms = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    if batch_norms:
        raise ExportRefused(f"{path.name}: {batch_norms} BatchNormalization node(s) were not folded into convs")


def describe(checkpoint: dict, checkpoint_path: Path, name: str, opset: int = OPSET) -> ModelInfo:
    """The fp32 model's metadata, from its checkpoint."""
    digest = sha256_of(checkpoint_path)
    return ModelInfo(
        name=name,
        version=digest[:12],  # content-addressed: the same checkpoint always exports the same version
        arch=checkpoint["arch"],
        labels=tuple(checkpoint["labels"]),
        preprocessing=PreprocessSpec.from_dict(checkpoint["preprocessing"]),
        checkpoint_sha256=digest,
        exported_at=now(),
        metrics=checkpoint.get("metrics", {}),
        precision="fp32",
        stability=checkpoint.get("stability", {}),
        init_from={key: checkpoint["init_from"][key] for key in ("file", "sha256", "source")}
        if checkpoint.get("init_from") else {},
        extra={"model_args": json.dumps(checkpoint["model_args"]), "opset": str(opset),
               "exporter": json.dumps(versions())},
    )


def variant_info(fp32: ModelInfo, precision: str, fp32_sha256: str, details: dict) -> ModelInfo:
    """The fp32 model's metadata with the variant's precision, version, time and provenance."""
    return replace(fp32, version=f"{fp32.version}-{precision}",  # a client can tell which variant answered
                   precision=precision, exported_at=now(),
                   extra={**fp32.extra, "variant": json.dumps({"of_sha256": fp32_sha256, **details}),
                          "exporter": json.dumps(versions())})


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": ort.__version__}


def annotate(path: Path, info: ModelInfo) -> None:
    """Replace the ONNX file's metadata with `info`'s (ModelInfo.to_metadata, which the service reads back)."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in info.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = f"Keel image classifier {info.name} ({info.arch}, {info.precision})"
    onnx.save(model, str(path))


def load_images(paths: list[Path], spec: PreprocessSpec, label: str) -> np.ndarray:
    """Preprocess `paths` exactly as the service does, with a progress line; N x 3 x S x S."""
    progress = Progress(len(paths), label, log_lines=2)
    batch = np.empty((len(paths), 3, spec.crop, spec.crop), dtype=np.float32)
    for i, path in enumerate(paths):
        try:
            batch[i] = preprocess_bytes(path.read_bytes(), spec)
        except (ImageDecodeError, OSError) as exc:
            progress.clear()
            raise ExportError(f"{path}: cannot use this image: {exc}") from None
        progress.update()
    progress.close()
    return batch


def spread_over(paths: list[Path], limit: int) -> list[Path]:
    """At most `limit` paths taken at an even stride: every class folder, not just the first ones."""
    return paths[:: max(1, len(paths) // limit)][:limit]


def sample_inputs(spec: PreprocessSpec, samples_dir: Path | None, limit: int = 32,
                  log: Log = print) -> tuple[np.ndarray, str]:
    """Real images when there are any (the given folder, else the training run's validation split);
    without them (a converted checkpoint has no training data) synthetic images, said in the log and
    the report. Returns the batch and its source."""
    paths = spread_over(find_images(samples_dir), limit) if samples_dir is not None and samples_dir.is_dir() else []
    if paths:
        return load_images(paths, spec, "parity images"), str(samples_dir)
    where = f"no images at {samples_dir}" if samples_dir is not None else "the checkpoint names no training data"
    log(f"note: {where}; parity runs on {limit} synthetic images (pass --parity-images DIR for real ones)")
    return synthetic_images(spec, limit), SYNTHETIC


SYNTHETIC = "synthetic images (rendered shapes)"


def synthetic_images(spec: PreprocessSpec, count: int) -> np.ndarray:
    """`count` images made here, through the model's own preprocessing: the built-in data set's shapes
    (edges, flat colour, gradients, noise) at the resize size, so the inputs lie where real ones do,
    which random tensors do not."""
    from training.shapes import CLASSES, render_sample

    rng = np.random.default_rng(0)
    return np.stack([preprocess(render_sample(CLASSES[i % len(CLASSES)], rng, spec.resize), spec)
                     for i in range(count)])


def labelled_images(root: Path, labels: list[str], spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """An ImageFolder split (`root/<label>/*`) -> preprocessed images and their class indices."""
    paths = find_images(root)
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({p.parent.name for p in paths} - set(index))
    if unknown:
        raise ExportError(f"{root}: class folder(s) {', '.join(unknown)} are not among the model's labels")
    targets = np.array([index[p.parent.name] for p in paths])
    return load_images(paths, spec, f"loading {root.name}/"), targets


def predict_all(classifier: OnnxClassifier, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return np.concatenate([classifier.predict(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])


def parity_report(model: nn.Module, onnx_path: Path, inputs: np.ndarray, source: str) -> dict:
    """Compare ONNX Runtime (CPU) with the original, unfolded PyTorch model on `inputs`, run at
    every size in PARITY_BATCH_SIZES: this proves the export, the batch-norm fold and the dynamic
    batch at once."""
    classifier = OnnxClassifier(onnx_path, device="cpu")
    with torch.no_grad():
        expected = torch.softmax(model.eval()(torch.from_numpy(inputs)), dim=1).numpy()
    worst, agreement = agreement_at_batch_sizes(classifier, inputs, expected)
    return {
        "precision": "fp32",
        "reference": "pytorch",
        "samples": len(inputs),
        "sample_source": source,
        "batch_sizes": list(PARITY_BATCH_SIZES),
        "max_abs_diff": worst,
        "tolerance": PROBABILITY_TOLERANCE,
        "top1_agreement": agreement,
        "passed": worst <= PROBABILITY_TOLERANCE and agreement == 1.0,
        "provider": classifier.provider,
    }


def agreement_at_batch_sizes(classifier: OnnxClassifier, inputs: np.ndarray,
                             expected: np.ndarray) -> tuple[float, float]:
    """Worst max |dp| and worst top-1 agreement with `expected` over PARITY_BATCH_SIZES."""
    worst, agreement = 0.0, 1.0
    for batch_size in PARITY_BATCH_SIZES:
        got = predict_all(classifier, inputs, batch_size)
        worst = max(worst, float(np.abs(got - expected).max()))
        agreement = min(agreement, float((got.argmax(1) == expected.argmax(1)).mean()))
    return worst, agreement


@dataclass
class Reference:
    """The verified fp32 model's answers, computed once, that every variant is compared with."""

    classifier: OnnxClassifier
    inputs: np.ndarray
    source: str
    test_x: np.ndarray
    test_y: np.ndarray
    test_source: str

    def __post_init__(self):
        self.expected = predict_all(self.classifier, self.inputs)
        self.test_probabilities = predict_all(self.classifier, self.test_x)
        self.test_top1 = float((self.test_probabilities.argmax(1) == self.test_y).mean())


def compare_variant(reference: Reference, path: Path, precision: str, max_drop: float) -> dict:
    """A variant against the fp32 model: parity on the parity images (at every batch size) and
    top-1 accuracy on the test split. fp16 runs where the service would run it (CUDA if this
    machine has it); int8 QDQ targets the CPU provider."""
    classifier = OnnxClassifier(path, device="auto" if precision == "fp16" else "cpu")
    worst, agreement = agreement_at_batch_sizes(classifier, reference.inputs, reference.expected)
    test_probabilities = predict_all(classifier, reference.test_x)
    top1 = float((test_probabilities.argmax(1) == reference.test_y).mean())
    report = {
        "precision": precision,
        "reference": "fp32 onnx",
        "provider": classifier.provider,
        "parity": {"samples": len(reference.inputs), "sample_source": reference.source,
                   "batch_sizes": list(PARITY_BATCH_SIZES), "max_abs_diff": worst, "top1_agreement": agreement},
        "test": {"images": len(reference.test_y), "source": reference.test_source,
                 "fp32_top1": reference.test_top1, "top1": top1, "top1_delta": top1 - reference.test_top1,
                 "top1_agreement": float((test_probabilities.argmax(1)
                                          == reference.test_probabilities.argmax(1)).mean()),
                 "max_abs_diff": float(np.abs(test_probabilities - reference.test_probabilities).max())},
        "max_accuracy_drop": max_drop,
        # a tiny epsilon: 0.5 - 0.49 is 0.010000000000000009 in floats
        "passed": reference.test_top1 - top1 <= max_drop + 1e-9,
    }
    if precision == "fp16" and classifier.provider == "CPUExecutionProvider":
        report["note"] = ("measured on the CPU provider, which has no fp16 kernels for these ops: ONNX Runtime "
                          "inserts casts and computes in fp32, so this verifies the graph and the fp16 rounding "
                          "of the weights, not CUDA's fp16 arithmetic (export on a CUDA machine to measure that)")
    return report


def export_uint8_input(folded: nn.Module, spec: PreprocessSpec, out_path: Path, scratch: Path,
                       info: ModelInfo, samples_dir: Path | None, log: Log) -> dict:
    """The uint8 NHWC-input variant of the verified fp32 model, proven against it: the fp32 model on
    the service's float preprocessing vs this graph on the same images' uint8 crops, at every
    parity batch size, within the fp32 tolerance."""
    from PIL import Image

    from service.preprocessing import decode_image, normalize, resize_and_crop, to_rgb

    target = variant_path(out_path, UINT8_NHWC)
    candidate = scratch / target.name
    export_graph(folded, spec, candidate, uint8_nhwc=True)
    annotate(candidate, replace(info, version=f"{info.version}-{UINT8_NHWC}", exported_at=now(),
                                extra={**info.extra, "input": json.dumps({
                                    "name": UINT8_INPUT_NAME, "dtype": "uint8", "layout": "NHWC",
                                    "channel_order": "RGB", "normalization": "in graph"})}))
    check_graph(candidate, spec, len(info.labels), uint8_nhwc=True)

    paths = spread_over(find_images(samples_dir), 32) if samples_dir is not None and samples_dir.is_dir() else []
    if paths:
        crops: list[Image.Image] = [resize_and_crop(to_rgb(decode_image(p.read_bytes())), spec) for p in paths]
        source = str(samples_dir)
    else:  # random pixels only as a last resort, as for the fp32 parity
        rng = np.random.default_rng(0)
        crops = [Image.fromarray(rng.integers(0, 256, (spec.crop, spec.crop, 3), dtype=np.uint8)) for _ in range(32)]
        source = "random pixels"
    pixels = np.stack([np.asarray(crop, dtype=np.uint8) for crop in crops])
    expected = predict_all(OnnxClassifier(out_path, device="cpu"), np.stack([normalize(c, spec) for c in crops]))
    session = ort.InferenceSession(str(candidate), providers=["CPUExecutionProvider"])
    worst, agreement = 0.0, 1.0
    for batch_size in PARITY_BATCH_SIZES:
        got = np.concatenate([session.run([OUTPUT_NAME], {UINT8_INPUT_NAME: pixels[i:i + batch_size]})[0]
                              for i in range(0, len(pixels), batch_size)])
        worst = max(worst, float(np.abs(got - expected).max()))
        agreement = min(agreement, float((got.argmax(1) == expected.argmax(1)).mean()))
    report = {"precision": "fp32", "input": UINT8_NHWC, "reference": "fp32 onnx on float preprocessing",
              "samples": len(pixels), "sample_source": source, "batch_sizes": list(PARITY_BATCH_SIZES),
              "max_abs_diff": worst, "tolerance": PROBABILITY_TOLERANCE, "top1_agreement": agreement,
              "passed": worst <= PROBABILITY_TOLERANCE and agreement == 1.0, "provider": "CPUExecutionProvider",
              "note": "export only: the service and the batch job still send float32 NCHW to model.onnx"}
    if not report["passed"]:
        raise ExportRefused(f"{target}: the uint8-input graph disagrees with the fp32 model: max |dp| {worst:.2e}, "
                          f"top-1 agreement {agreement:.1%}; not written")
    publish(candidate, target, report)
    log(f"wrote {target} (parity with the fp32 model: max |dp| {worst:.1e}) and {report_path(target).name}")
    return report


def convert_fp16(fp32_path: Path, out: Path) -> dict:
    """float16 weights and arithmetic, float32 at the graph's input and output (keep_io_types), so
    callers and the service's preprocessing are unchanged."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    wrapper = OnnxModel(model)
    wrapper.topological_sort()  # the converter appends its input casts at the end of the node list
    onnx.save(wrapper.model, str(out))
    return {"method": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True}


def quantize_int8(fp32_path: Path, out: Path, calibration_dir: Path, spec: PreprocessSpec, count: int,
                  scratch: Path, log: Log) -> dict:
    """Static QDQ quantization: int8 per-channel weights and uint8 activations (what ONNX Runtime's
    x86 kernels run fastest, U8S8), with activation ranges calibrated (MinMax) on training images
    preprocessed exactly as the service does. Only Conv and Gemm are quantized, and not the last
    Gemm (the classifier: a few thousand weights that decide the ranking; on the test model keeping
    it float raised top-1 agreement with fp32 from 92.5% to 94.5%); the softmax stays float, so
    probabilities keep their resolution."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    paths = spread_over(find_images(calibration_dir), count)
    images = load_images(paths, spec, "calibration images")

    class Batches(CalibrationDataReader):
        def __init__(self, batch_size: int = 32):
            self.batches = iter([images[i:i + batch_size] for i in range(0, len(images), batch_size)])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    prepared = scratch / "int8-prepared.onnx"
    # ONNX Runtime's recommended pre-pass: shape inference and graph clean-up before quantization.
    quant_pre_process(str(fp32_path), str(prepared))
    classifier = [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Gemm"][-1:]
    quantize_static(
        str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "Gemm"],
        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=classifier,
    )
    prune_opset_imports(out)
    log(f"calibrated on {len(images)} images from {calibration_dir}")
    return {"method": "onnxruntime.quantization.quantize_static", "format": "QDQ", "weights": "int8 per-channel",
            "activations": "uint8", "quantized_ops": ["Conv", "Gemm"], "kept_float": classifier,
            "calibration": "MinMax", "calibration_images": len(images), "calibration_source": str(calibration_dir)}


def prune_opset_imports(path: Path) -> None:
    """The quantizer's pre-pass declares every ONNX Runtime domain (com.microsoft.nchwc, ...);
    keep only the default domain and the domains nodes actually use, so the file stays portable."""
    model = onnx.load(str(path))
    used = {node.domain for node in model.graph.node}
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    onnx.save(model, str(path))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_to_bentoml(onnx_path: Path, name: str, log: Log = print) -> str:
    """Copy the model, its variants from the same checkpoint, and every parity report into the
    BentoML model store; returns the tag. The service loads `model.onnx` from the entry."""
    import bentoml

    onnx_path = Path(onnx_path)
    info = OnnxClassifier(onnx_path, device="cpu").info
    files = {"model.onnx": onnx_path}
    variants = {}
    for precision in PRECISIONS[1:]:
        path = variant_path(onnx_path, precision)
        if not path.is_file():
            continue
        variant = OnnxClassifier(path, device="cpu").info
        if variant.checkpoint_sha256 != info.checkpoint_sha256:  # a stale file from another checkpoint
            log(f"not storing {path}: it was exported from another checkpoint")
            continue
        files[f"model.{precision}.onnx"] = path
        variants[precision] = {"file": f"model.{precision}.onnx", **summarize(report_path(path))}
    for stored, path in list(files.items()):
        if report_path(path).is_file():
            files[Path(stored).with_suffix(".parity.json").name] = report_path(path)
    with bentoml.models.create(
        name,
        labels={"arch": info.arch, "project": "keel"},
        metadata={"labels": list(info.labels), "metrics": info.metrics, "checkpoint_sha256": info.checkpoint_sha256,
                  "version": info.version, "arch": info.arch, "parity": summarize(report_path(onnx_path)),
                  "variants": variants},
    ) as model_ref:
        for stored, path in files.items():
            shutil.copyfile(path, model_ref.path_of(stored))
    log(f"saved to the BentoML model store as {model_ref.tag} ({', '.join(sorted(files))})")
    return str(model_ref.tag)


def summarize(path: Path) -> dict:
    """The few numbers of a parity report worth carrying as store metadata."""
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    parity = report.get("parity", report)
    summary = {"max_abs_diff": parity["max_abs_diff"], "top1_agreement": parity["top1_agreement"],
               "passed": report["passed"]}
    if "test" in report:
        summary.update(test_top1=report["test"]["top1"], test_top1_delta=report["test"]["top1_delta"])
    return summary


