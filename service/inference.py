"""An exported Keel model in an ONNX Runtime session: its metadata (`ModelInfo`, which export writes
and everything else reads), provider selection, the session, and turning its probabilities into
answers. Shared by the HTTP service and the batch job; no torch here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.preprocessing import PreprocessSpec

log = logging.getLogger("keel")

INPUT_NAME = "input"  # N x 3 x S x S float32, normalized as the model's preprocessing spec says
OUTPUT_NAME = "probabilities"  # N x classes, softmax already applied inside the graph
METADATA_PREFIX = "keel."
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")


class ModelLoadError(RuntimeError):
    """The model file is missing, unreadable, not a Keel export, or cannot run where asked."""


@dataclass(frozen=True)
class ModelInfo:
    """Everything a consumer needs to use an exported model: the `keel.*` ONNX metadata, which
    `to_metadata` writes (export does) and `from_metadata` reads back."""

    name: str
    version: str
    arch: str
    labels: tuple[str, ...]
    preprocessing: PreprocessSpec
    checkpoint_sha256: str = ""
    exported_at: str = ""
    metrics: dict = field(default_factory=dict)
    precision: str = "fp32"  # fp32, or the export variant (fp16, int8); older exports are fp32
    stability: dict = field(default_factory=dict)  # the training run's stability report
    init_from: dict = field(default_factory=dict)  # initial weights' {"file", "sha256", "source"}; {}: from scratch
    # Every other keel.* key (model_args, opset, exporter, variant, input, ...), as the strings stored:
    # provenance that consumers do not interpret, carried unchanged.
    extra: dict[str, str] = field(default_factory=dict)

    REQUIRED = ("name", "version", "arch", "labels", "preprocessing")

    def to_metadata(self) -> dict[str, str]:
        """The ONNX `metadata_props` describing this model: keel.<field> -> string (JSON where structured)."""
        values = {
            "name": self.name, "version": self.version, "precision": self.precision, "arch": self.arch,
            "labels": json.dumps(list(self.labels)), "preprocessing": self.preprocessing.to_json(),
            "metrics": json.dumps(self.metrics), "stability": json.dumps(self.stability),
            "checkpoint_sha256": self.checkpoint_sha256, "exported_at": self.exported_at,
            **({"init_from": json.dumps(self.init_from)} if self.init_from else {}), **self.extra,
        }
        return {METADATA_PREFIX + key: value for key, value in values.items()}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str | Path) -> ModelInfo:
        props = {k[len(METADATA_PREFIX):]: v for k, v in metadata.items() if k.startswith(METADATA_PREFIX)}
        missing = [key for key in cls.REQUIRED if key not in props]
        if missing:
            raise ModelLoadError(f"{source}: not a Keel model "
                                 f"(ONNX metadata lacks {', '.join(METADATA_PREFIX + m for m in missing)})")
        typed = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            name=props["name"], version=props["version"], arch=props["arch"],
            labels=tuple(json.loads(props["labels"])),
            preprocessing=PreprocessSpec.from_json(props["preprocessing"]),
            checkpoint_sha256=props.get("checkpoint_sha256", ""), exported_at=props.get("exported_at", ""),
            metrics=json.loads(props.get("metrics", "{}")), precision=props.get("precision", "fp32"),
            stability=json.loads(props.get("stability", "{}")), init_from=json.loads(props.get("init_from", "{}")),
            extra={key: value for key, value in props.items() if key not in typed},
        )

    def to_dict(self) -> dict:
        """What /metadata shows of the model."""
        return {
            "name": self.name, "version": self.version, "arch": self.arch, "labels": list(self.labels),
            "input_size": [self.preprocessing.crop, self.preprocessing.crop],
            "preprocessing": self.preprocessing.to_dict(), "checkpoint_sha256": self.checkpoint_sha256,
            "exported_at": self.exported_at, "metrics": self.metrics, "precision": self.precision,
            "stability": self.stability, "init_from": self.init_from,
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


def select_providers(device: str, available: list[str], has_gpu: bool, tensorrt: bool = False) -> list[str]:
    """Execution providers to ask ONNX Runtime for, best first.

    "auto" asks for CUDA when this onnxruntime build has it and a GPU is visible, with the CPU as
    fallback; "cuda" insists on CUDA (the caller still checks what the session really got);
    "cpu" never touches the GPU. `tensorrt` puts TensorRT in front of CUDA where the build has it:
    it is off by default because its first start compiles engines for minutes and needs the
    TensorRT libraries, which the image does not ship.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cuda" and CUDA not in available:
        raise ModelLoadError(f"device 'cuda' requested but this onnxruntime offers only {', '.join(available)}")
    if device == "cuda" or (device == "auto" and CUDA in available and has_gpu):
        return ([TENSORRT] if tensorrt and TENSORRT in available else []) + [CUDA, CPU]
    return [CPU]


def provider_options(providers: list[str], cache_dir: str | Path | None = None) -> list[tuple[str, dict]]:
    """Each provider with the options Keel runs it with (ONNX Runtime's `providers=` format)."""
    options = {
        CUDA: {
            # Benchmark every cuDNN convolution algorithm once per input shape and keep the fastest.
            # The search costs seconds per shape, which is why batches are padded to a few bucket
            # sizes on GPU and every bucket is run at warm-up: the search never hits a request.
            "cudnn_conv_algo_search": "EXHAUSTIVE",
            # Let those algorithms use as much workspace as they want: faster convolutions for a
            # bounded amount of memory on a GPU that serves only this process's models.
            "cudnn_conv_use_max_workspace": "1",
            # Grow the memory arena by what is asked, not by powers of two: warm-up allocates the
            # largest batch once, so doubling would only strand memory other models could use.
            "arena_extend_strategy": "kSameAsRequested",
            # Copy inputs on the compute stream: no cross-stream synchronisation per call.
            "do_copy_in_default_stream": "1",
        },
        TENSORRT: {
            # Compiled engines are cached on disk, so only the first start pays for building them;
            # FP16 where the GPU supports it (ONNX Runtime checks per layer).
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache_dir or Path.home() / ".cache" / "keel-tensorrt"),
            "trt_fp16_enable": "True",
        },
    }
    return [(name, options.get(name, {})) for name in providers]


def container_cpus() -> int:
    """The CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota.

    `os.cpu_count()` reports the host's cores; in a container limited to 2 CPUs, sizing thread
    pools to 64 host cores makes them fight over the quota and slows every request.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else max(1, cpus)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup quota (v2 `cpu.max`, or v1 `cpu.cfs_quota_us`), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def batch_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes a GPU session runs: powers of two up to, and including, `max_batch_size`."""
    buckets = [1]
    while buckets[-1] * 2 < max_batch_size:
        buckets.append(buckets[-1] * 2)
    return buckets + ([max_batch_size] if max_batch_size > 1 else [])


def read_model_info(path: str | Path) -> ModelInfo:
    """A model's metadata without keeping a session (for processes that never run it)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # load fast, never run
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=[CPU])
    except Exception as exc:
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load it: {exc}") from None
    return ModelInfo.from_metadata(session.get_modelmeta().custom_metadata_map, path)


class OnnxClassifier:
    """One ONNX Runtime session for one exported model; load once, call `predict` many times."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 0, tensorrt: bool = False,
                 max_batch_size: int = 32, spinning: bool = True):
        """`spinning=False` where other threads of the process (decoders) need the CPUs between runs:
        ONNX Runtime's idle intra-op threads otherwise spin-wait for the next run on those CPUs."""
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: no such model file")
        options = ort.SessionOptions()
        # Sized to the container, not the host; one inter-op thread since these graphs are a chain.
        self.threads = threads or container_cpus()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: CUDA-missing warnings are reported by us, once
        providers = select_providers(device, ort.get_available_providers(), gpu_visible(), tensorrt)
        if CUDA in providers:
            preload_cuda_libraries()
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=provider_options(providers))
        except Exception as exc:
            raise ModelLoadError(f"{self.path}: ONNX Runtime cannot load it: {exc}") from None
        # What the session really runs on: a provider ONNX Runtime lists can still fail to
        # initialise (no driver, no GPU) and silently leave only the CPU.
        self.providers = self.session.get_providers()
        self.provider = self.providers[0]
        if device == "cuda" and self.provider not in (CUDA, TENSORRT):
            raise ModelLoadError(f"{self.path}: KEEL_DEVICE=cuda requires the GPU, but ONNX Runtime could not "
                                 f"initialise CUDA and fell back to {self.provider} (check the driver and "
                                 f"CUDA/cuDNN libraries; KEEL_DEVICE=auto would serve on the CPU)")
        # On GPU a new input shape costs a cuDNN algorithm search (and a TensorRT engine build), so
        # batches are padded up to a few bucket sizes that warm-up has already run; on CPU every
        # shape is equally cheap and padding would only waste work.
        self.buckets = batch_buckets(max_batch_size) if self.provider != CPU else None
        self.info = ModelInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map, self.path)
        log.info("loaded model %s version %s from %s on %s (%d CPU threads)", self.info.name, self.info.version,
                 self.path, self.provider, self.threads)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """N x 3 x S x S float32 -> N x classes probabilities."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        n = len(batch)
        if self.buckets and n < self.buckets[-1]:
            size = next(b for b in self.buckets if b >= n)
            batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), np.float32)]) if size > n else batch
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0][:n]

    def warm_up(self, batch_sizes: list[int]) -> dict[int, float]:
        """Run each batch size once, so no request pays for first-run allocations or GPU
        algorithm searches; returns milliseconds per batch size."""
        crop = self.info.preprocessing.crop
        timings = {}
        for size in batch_sizes:
            started = time.perf_counter()
            self.predict(np.zeros((size, 3, crop, crop), np.float32))
            timings[size] = round((time.perf_counter() - started) * 1000, 1)
        log.info("warmed up %s on %s: ms per batch size %s", self.info.name, self.provider, timings)
        return timings


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


def decoded(inputs: Sequence[np.ndarray | str]) -> np.ndarray | None:
    """The inputs that decoded (arrays, in order) as one batch to infer; None when none did. The
    others are error messages (strings): see result_rows."""
    good = [item for item in inputs if isinstance(item, np.ndarray)]
    return np.stack(good) if good else None


def result_rows(key: str, names: Sequence[str], inputs: Sequence[np.ndarray | str], probabilities: Sequence[np.ndarray],
                labels: tuple[str, ...], k: int) -> list[dict]:
    """One answer row per input, in input order: {key: name, "predictions": top k} for each input that
    decoded, taking the next row of `probabilities` (the answers to `decoded(inputs)`), and
    {key: name, "error": message} for each that did not. What /classify_batch, the batch job and the
    HTTP batch task all answer."""
    answers = iter(probabilities)
    return [{key: name, "predictions": top_k(next(answers), labels, k)} if isinstance(item, np.ndarray)
            else {key: name, "error": item} for name, item in zip(names, inputs)]


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
            f"(export one with `keel-export CHECKPOINT --out model.onnx --bentoml NAME`)"
        ) from None
