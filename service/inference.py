"""The inference core shared by the HTTP service and the batch job: an exported Keel model in an
ONNX Runtime session, its metadata, provider selection and post-processing. No torch here.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.preprocessing import PreprocessSpec

log = logging.getLogger("keel")

INPUT_NAME = "input"  # N x 3 x S x S float32, normalized as the model's preprocessing spec says
OUTPUT_NAME = "probabilities"  # N x classes, softmax already applied inside the graph
METADATA_PREFIX = "keel."
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")


class ModelLoadError(RuntimeError):
    """The model file is missing, unreadable, not a Keel export, or cannot run where asked."""


@dataclass(frozen=True)
class ModelInfo:
    """Everything a consumer needs to use an exported model, read from its ONNX metadata."""

    name: str
    version: str
    arch: str
    labels: tuple[str, ...]
    preprocessing: PreprocessSpec
    checkpoint_sha256: str = ""
    exported_at: str = ""
    metrics: dict = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str | Path) -> ModelInfo:
        props = {k[len(METADATA_PREFIX):]: v for k, v in metadata.items() if k.startswith(METADATA_PREFIX)}
        missing = [key for key in ("name", "version", "arch", "labels", "preprocessing") if key not in props]
        if missing:
            raise ModelLoadError(f"{source}: not a Keel model (ONNX metadata lacks {', '.join(METADATA_PREFIX + m for m in missing)})")
        return cls(
            name=props["name"], version=props["version"], arch=props["arch"],
            labels=tuple(json.loads(props["labels"])),
            preprocessing=PreprocessSpec.from_json(props["preprocessing"]),
            checkpoint_sha256=props.get("checkpoint_sha256", ""), exported_at=props.get("exported_at", ""),
            metrics=json.loads(props.get("metrics", "{}")),
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name, "version": self.version, "arch": self.arch, "labels": list(self.labels),
            "input_size": [self.preprocessing.crop, self.preprocessing.crop],
            "preprocessing": self.preprocessing.to_dict(), "checkpoint_sha256": self.checkpoint_sha256,
            "exported_at": self.exported_at, "metrics": self.metrics,
        }


def gpu_visible() -> bool:
    """Whether this machine (or container) exposes an NVIDIA GPU at all.

    onnxruntime-gpu lists CUDAExecutionProvider whether or not a GPU exists; asking for it on a
    machine without one costs a failed library load and a screenful of errors, so "auto" only
    asks when the driver's device nodes are there.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def select_providers(device: str, available: list[str], has_gpu: bool) -> list[str]:
    """Execution providers to ask ONNX Runtime for, best first.

    "auto" asks for CUDA when this onnxruntime build has it and a GPU is visible, with the CPU as
    fallback; "cuda" insists on CUDA (the caller still checks what the session really got);
    "cpu" never touches the GPU.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cuda":
        if CUDA not in available:
            raise ModelLoadError(f"device 'cuda' requested but this onnxruntime offers only {', '.join(available)}")
        return [CUDA, CPU]
    if device == "auto" and CUDA in available and has_gpu:
        return [CUDA, CPU]
    return [CPU]


class OnnxClassifier:
    """One ONNX Runtime session for one exported model; load once, call `predict` many times."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 0):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: no such model file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0 lets ONNX Runtime use one thread per core
        options.log_severity_level = 3  # errors only: CUDA-missing warnings are reported by us, once
        providers = select_providers(device, ort.get_available_providers(), gpu_visible())
        if CUDA in providers:
            preload_cuda_libraries()
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:
            raise ModelLoadError(f"{self.path}: ONNX Runtime cannot load it: {exc}") from None
        # What the session really runs on: a provider ONNX Runtime lists can still fail to
        # initialise (no driver, no GPU) and silently leave only the CPU.
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != CUDA:
            raise ModelLoadError(f"{self.path}: device 'cuda' requested but ONNX Runtime fell back to {self.provider}")
        self.info = ModelInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map, self.path)
        log.info("loaded model %s version %s from %s on %s", self.info.name, self.info.version, self.path, self.provider)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """N x 3 x S x S float32 -> N x classes probabilities."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels when they are installed (onnxruntime-gpu[cuda,cudnn]),
    so the image needs no CUDA base; a no-op on machines without them."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # missing libraries only mean CUDA will be refused below
            log.debug("onnxruntime.preload_dlls failed: %s", exc)


def top_k(probabilities: np.ndarray, labels: tuple[str, ...] | list[str], k: int) -> list[dict]:
    """One image's class probabilities -> the k best as [{"label", "score"}], best first."""
    k = max(1, min(k, len(labels)))
    best = np.argsort(-probabilities, kind="stable")[:k]
    return [{"label": labels[i], "score": round(float(probabilities[i]), 6)} for i in best]


def resolve_model(reference: str) -> Path:
    """A model reference is a path to an .onnx file or a BentoML model tag (`name[:version]`)."""
    candidate = Path(reference)
    if candidate.suffix == ".onnx" or candidate.exists() or os.sep in reference:
        if not candidate.is_file():
            raise ModelLoadError(f"{candidate}: no such model file")
        return candidate
    import bentoml  # only when a tag is given: the batch job works without a model store

    try:
        return Path(bentoml.models.get(reference).path_of("model.onnx"))
    except bentoml.exceptions.NotFound:
        raise ModelLoadError(
            f"model {reference!r} is neither an .onnx file nor in the BentoML model store "
            f"(export one with `python -m export CHECKPOINT --out model.onnx --bentoml NAME`)"
        ) from None
