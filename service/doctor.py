"""`python -m service.doctor [--json] [--model PATH_OR_TAG] [--device auto|cpu|cuda]`: what really runs where.

onnxruntime-gpu lists CUDAExecutionProvider whether or not CUDA can run, and a session that cannot
get it falls back to the CPU without failing (onnxruntime#11092 and its many duplicates). This
command answers, on the machine or in the container that will serve:

- onnxruntime: version, package, the CUDA version it was built for, build info, the providers it
  offers, and every onnxruntime distribution installed (two of them shadow each other);
- the GPU: device nodes, and what NVML (nvidia-ml-py, else `nvidia-smi`) says: driver, GPUs, memory;
- the CUDA driver (libcuda: cuInit, version, devices) and every CUDA/cuDNN library the CUDA
  provider needs (read from the provider library itself), each loaded or not, and from which file,
  after `onnxruntime.preload_dlls` as the service runs it;
- for each model the service would serve (KEEL_MODEL / KEEL_MODELS, read as the service reads
  them; a tiny built-in graph when neither is set): the provider its session really got with the
  options in effect, load and warm-up time, agreement with the CPU provider, and images/s at batch
  1, 8 and 32.

Exit status: 0 the sessions run where KEEL_DEVICE asks; 1 a GPU is visible but the sessions fell
back to the CPU (KEEL_DEVICE=auto: the service would serve on the CPU without a word); 2 unusable:
a bad KEEL_* setting, a model that cannot be loaded, or KEEL_DEVICE=cuda where CUDA cannot be used
(the reason is printed). Never imports torch; in the container image:
`podman run --rm --entrypoint python -w /home/bentoml/bento/src keel:latest -m service.doctor`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort

import service
from service.config import ServiceConfig
from service.inference import (
    CPU,
    CUDA,
    DEVICES,
    TENSORRT,
    ModelLoadError,
    OnnxClassifier,
    container_cpus,
    gpu_visible,
    preload_cuda_libraries,
    resolve_model,
)
from service.preprocessing import PreprocessSpec

BATCH_SIZES = (1, 8, 32)
# cuDNN is not a link-time dependency of the CUDA provider (it is opened when the first session
# starts), so it is not among the provider library's DT_NEEDED entries; onnxruntime-gpu 1.31 is
# built for cuDNN 9, the file its preload_dlls loads.
CUDNN = "libcudnn.so.9"
CUDA_LIBRARY_WORDS = ("cuda", "cublas", "cudnn", "cufft", "curand", "nvrtc", "nvjitlink")
BUILTIN_NAME = "keel-doctor-graph"
EXIT_OK, EXIT_FALLBACK, EXIT_UNUSABLE = 0, 1, 2


# --- onnxruntime ------------------------------------------------------------------------------------


def onnxruntime_report() -> dict:
    from onnxruntime.capi import build_and_package_info as package_info

    distributions = sorted(
        {(d.metadata["Name"], d.version, str(Path(str(d.locate_file(""))).resolve()))
         for d in metadata.distributions() if (d.metadata["Name"] or "").lower().startswith("onnxruntime")})
    return {
        "version": ort.__version__,
        "package": getattr(package_info, "package_name", "unknown"),
        "cuda_version": getattr(package_info, "cuda_version", None),  # what the build expects; None: a CPU build
        "device": ort.get_device(),
        "build": ort.get_build_info() if hasattr(ort, "get_build_info") else "",
        "location": str(Path(ort.__file__).parent),
        "providers": ort.get_available_providers(),
        "distributions": [{"name": n, "version": v, "location": loc} for n, v, loc in distributions],
    }


# --- the GPU: device nodes, NVML, the CUDA driver ---------------------------------------------------------


def gpu_report() -> dict:
    """What the machine (or container) shows of NVIDIA GPUs, without CUDA: device nodes and NVML."""
    report = {"visible": gpu_visible(), "device_nodes": sorted(str(p) for p in Path("/dev").glob("nvidia*")),
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        report["nvml"] = nvml_report()
    except Exception as exc:  # no nvidia-ml-py, no libnvidia-ml, no driver: each says so in its message
        report["nvml"] = {"error": f"{type(exc).__name__}: {exc}".strip(": ")}
        report["nvidia_smi"] = nvidia_smi_report()
    return report


def nvml_report() -> dict:
    import pynvml  # nvidia-ml-py, which bentoml depends on

    pynvml.nvmlInit()
    try:
        def text(value) -> str:
            return value.decode() if isinstance(value, bytes) else str(value)

        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()  # e.g. 13000 for 13.0
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append({"index": index, "name": text(pynvml.nvmlDeviceGetName(handle)),
                         "memory_total_mib": memory.total // 2**20, "memory_used_mib": memory.used // 2**20,
                         "compute_capability": f"{major}.{minor}"})
        return {"driver": text(pynvml.nvmlSystemGetDriverVersion()),
                "cuda_driver_version": f"{cuda // 1000}.{cuda % 1000 // 10}", "gpus": gpus}
    finally:
        pynvml.nvmlShutdown()


def nvidia_smi_report() -> dict:
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return {"error": "nvidia-smi not found"}
    try:
        result = subprocess.run([binary, "--query-gpu=name,driver_version,memory.total,compute_cap",
                                 "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{binary}: {exc}"}
    if result.returncode != 0:
        return {"error": f"{binary} exited {result.returncode}: {(result.stderr or result.stdout).strip()[:300]}"}
    gpus = []
    for line in result.stdout.strip().splitlines():
        name, driver, memory, capability = (part.strip() for part in line.split(","))
        gpus.append({"name": name, "driver": driver, "memory_total_mib": memory, "compute_capability": capability})
    return {"gpus": gpus}


def cuda_driver_report() -> dict:
    """The CUDA driver API itself (libcuda, which the host's driver provides): can it start, on how many GPUs."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return {"loaded": False, "error": str(exc)}
    report: dict = {"loaded": True, "path": loaded_path("libcuda.so.1")}
    version, count = ctypes.c_int(), ctypes.c_int()
    status = cuda.cuInit(0)
    if status != 0:
        name = ctypes.c_char_p()
        cuda.cuGetErrorName(status, ctypes.byref(name))
        report["error"] = f"cuInit failed: {(name.value or b'').decode() or status}"
        return report
    cuda.cuDriverGetVersion(ctypes.byref(version))
    cuda.cuDeviceGetCount(ctypes.byref(count))
    report.update(version=f"{version.value // 1000}.{version.value % 1000 // 10}", devices=count.value)
    return report


# --- the CUDA provider's libraries -------------------------------------------------------------------------


def elf_needed(path: Path) -> list[str]:
    """The DT_NEEDED entries of a 64-bit little-endian ELF file: the libraries the dynamic loader must
    find before the file can load (what `readelf -d` lists as NEEDED)."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
        section_offset, = struct.unpack_from("<Q", data, 0x28)
        entry_size, count = struct.unpack_from("<HH", data, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size) for i in range(count)]
        needed = []
        for _, kind, _, _, offset, size, link, *_ in sections:
            if kind != 6:  # SHT_DYNAMIC; its sh_link is the string table the entries point into
                continue
            strings = sections[link][4]
            for position in range(offset, offset + size, 16):
                tag, value = struct.unpack_from("<qQ", data, position)
                if tag == 0:  # DT_NULL
                    break
                if tag == 1:  # DT_NEEDED
                    end = data.find(b"\0", strings + value)
                    needed.append(data[strings + value:end].decode())
        return needed


def loaded_path(soname: str) -> str | None:
    """The file this process has mapped for `soname` (symbolic links resolved), from /proc/self/maps."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if os.path.basename(path).startswith(soname):
            return path
    return None


def wheel_candidates(soname: str) -> list[str]:
    """Copies of `soname` in nvidia-* wheels anywhere on sys.path (a loader that misses them needs
    them on LD_LIBRARY_PATH, or preloaded)."""
    found = []
    for entry in sys.path:
        found += sorted(str(p) for p in Path(entry or ".").glob(f"nvidia/*/lib/{soname}") if p.exists())
    return list(dict.fromkeys(found))


def cuda_libraries_report() -> dict:
    """Each CUDA/cuDNN library the CUDA provider needs: loaded (and from where) or why not, after the
    preloading the service does. Loads them into this process, as a CUDA session would."""
    provider_library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not provider_library.is_file():
        return {"provider_library": None, "note": "this onnxruntime has no CUDA provider library"}
    said = io.StringIO()
    with contextlib.redirect_stdout(said):  # preload_dlls prints its failures; keep stdout for --json
        preload_cuda_libraries()
    try:
        needed = [name for name in elf_needed(provider_library) if any(w in name for w in CUDA_LIBRARY_WORDS)]
    except (OSError, ValueError) as exc:
        needed, error = [], str(exc)
    else:
        error = None
    libraries = []
    for soname in [*needed, CUDNN]:
        entry = {"name": soname}
        try:
            ctypes.CDLL(soname)
            entry.update(loaded=True, path=loaded_path(soname))
        except OSError as exc:
            entry.update(loaded=False, error=str(exc), found_in_wheels=wheel_candidates(soname))
        libraries.append(entry)
    try:
        ctypes.CDLL(str(provider_library))
        provider = {"loaded": True}
    except OSError as exc:
        provider = {"loaded": False, "error": str(exc)}
    report = {"provider_library": str(provider_library), "provider_library_loads": provider, "libraries": libraries,
              "preload_output": said.getvalue().strip()}
    if error:
        report["error"] = error
    return report


# --- the models' sessions ----------------------------------------------------------------------------------


def builtin_graph(path: Path, crop: int = 64, classes: int = 10) -> Path:
    """A tiny Keel-format classifier (conv 3x3 -> ReLU -> global average pool -> linear -> softmax,
    N x 3 x crop x crop -> N x classes) written to `path`, for when no model is configured.

    Encoded here as protobuf by hand because the serving side has no `onnx` package (it is a training
    and export dependency, not in the image); tests check the file with onnx.checker."""
    rng = np.random.default_rng(0)
    weights = {"conv.weight": rng.normal(0, 0.5, (8, 3, 3, 3)), "conv.bias": rng.normal(0, 0.1, 8),
               "fc.weight": rng.normal(0, 0.5, (classes, 8)), "fc.bias": rng.normal(0, 0.1, classes)}
    nodes = [
        _node("Conv", ["input", "conv.weight", "conv.bias"], ["conv"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        _node("Relu", ["conv"], ["relu"]),
        _node("GlobalAveragePool", ["relu"], ["pool"]),
        _node("Flatten", ["pool"], ["features"], axis=1),
        _node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], transB=1),
        _node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = b"".join(_bytes(1, node) for node in nodes) + _bytes(2, b"keel-doctor")
    graph += b"".join(_bytes(5, _tensor(name, value)) for name, value in weights.items())
    graph += _bytes(11, _value_info("input", ["N", 3, crop, crop])) + _bytes(12, _value_info("probabilities",
                                                                                               ["N", classes]))
    spec = PreprocessSpec(resize=crop, crop=crop)
    metadata_props = {"keel.name": BUILTIN_NAME, "keel.version": "builtin", "keel.arch": "doctor-conv",
                      "keel.labels": json.dumps([f"class{i}" for i in range(classes)]),
                      "keel.preprocessing": spec.to_json()}
    model = _varint_field(1, 8) + _bytes(2, b"keel.doctor") + _bytes(7, graph)  # ir_version 8
    model += _bytes(8, _bytes(1, b"") + _varint_field(2, 18))  # opset_import: the default domain, opset 18
    model += b"".join(_bytes(14, _bytes(1, k.encode()) + _bytes(2, v.encode())) for k, v in metadata_props.items())
    path.write_bytes(model)
    return path


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 values are ten-byte varints
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _node(op: str, inputs: list[str], outputs: list[str], **attributes) -> bytes:
    """NodeProto: input 1, output 2, name 3, op_type 4, attribute 5 (AttributeProto: name 1, i 3,
    ints 8, type 20 with INT = 2, INTS = 7)."""
    out = b"".join(_bytes(1, name.encode()) for name in inputs) + b"".join(_bytes(2, n.encode()) for n in outputs)
    out += _bytes(3, outputs[0].encode()) + _bytes(4, op.encode())
    for name, value in attributes.items():
        if isinstance(value, list):
            attribute = _bytes(1, name.encode()) + b"".join(_varint_field(8, v) for v in value) + _varint_field(20, 7)
        else:
            attribute = _bytes(1, name.encode()) + _varint_field(3, value) + _varint_field(20, 2)
        out += _bytes(5, attribute)
    return out


def _tensor(name: str, value: np.ndarray) -> bytes:
    """TensorProto: dims 1, data_type 2 (FLOAT = 1), name 8, raw_data 9 (little-endian)."""
    dims = b"".join(_varint_field(1, d) for d in value.shape)
    return dims + _varint_field(2, 1) + _bytes(8, name.encode()) + _bytes(9, value.astype("<f4").tobytes())


def _value_info(name: str, shape: list) -> bytes:
    """ValueInfoProto (name 1, type 2) of a float tensor: TypeProto.tensor_type 1 (elem_type 1, shape 2
    of TensorShapeProto.dim 1, each dim_value 1 or dim_param 2)."""
    dims = b"".join(_bytes(1, _varint_field(1, d) if isinstance(d, int) else _bytes(2, d.encode())) for d in shape)
    return _bytes(1, name.encode()) + _bytes(2, _bytes(1, _varint_field(1, 1) + _bytes(2, dims)))


def configured_models(config: ServiceConfig, override: str | None, scratch: Path) -> list[tuple[str | None, Path, str]]:
    """(serving name, model file, where it came from) for each model the service would serve; the name
    is None where the service serves a model under the name in its metadata."""
    if override:
        refs, origin = [(None, override)], "--model"
    elif os.environ.get("KEEL_MODELS", "").strip() or os.environ.get("KEEL_MODEL", "").strip():
        refs, origin = config.model_refs(), "KEEL_MODELS" if config.models.strip() else "KEEL_MODEL"
    else:
        return [(BUILTIN_NAME, builtin_graph(scratch / "keel-doctor.onnx"),
                 "built-in test graph (neither KEEL_MODEL nor KEEL_MODELS is set)")]
    from service.bentoml_internals import use_bento_model_store

    use_bento_model_store()
    return [(name, resolve_model(reference), f"{origin} {name + '=' if name else ''}{reference}")
            for name, reference in refs]


def check_model(name: str | None, path: Path, origin: str, config: ServiceConfig, device: str, seconds: float,
                batch_sizes: tuple[int, ...]) -> dict:
    """One model in a session made exactly as the service makes it: provider, timings, throughput."""
    started = time.perf_counter()
    classifier = OnnxClassifier(path, device=device, threads=config.cpu_threads, tensorrt=config.tensorrt,
                                max_batch_size=config.max_batch_size)
    load_ms = (time.perf_counter() - started) * 1000
    info = classifier.info
    crop = info.preprocessing.crop
    options = classifier.session.get_provider_options()
    report = {"name": name or info.name, "model_name": info.name, "version": info.version, "arch": info.arch,
              "precision": info.precision, "path": str(path), "origin": origin, "input": [3, crop, crop],
              "provider": classifier.provider, "providers": classifier.providers,
              "provider_options": {p: options.get(p, {}) for p in classifier.providers if p != CPU},
              "cpu_threads": classifier.threads, "batch_buckets": classifier.buckets, "load_ms": round(load_ms, 1),
              "warmup_ms": {str(k): v for k, v in classifier.warm_up(list(batch_sizes)).items()}}
    batch = np.random.default_rng(0).standard_normal((max(batch_sizes), 3, crop, crop)).astype(np.float32)
    probabilities = classifier.predict(batch)
    report["finite"] = bool(np.isfinite(probabilities).all())
    if classifier.provider != CPU:  # the same answers as the CPU provider?
        reference = OnnxClassifier(path, device="cpu").predict(batch)
        report["max_abs_diff_vs_cpu"] = float(np.abs(probabilities - reference).max())
        report["top1_agreement_vs_cpu"] = float((probabilities.argmax(1) == reference.argmax(1)).mean())
    report["throughput"] = [measure(classifier, batch[:n], seconds) for n in batch_sizes]
    return report


def measure(classifier: OnnxClassifier, batch: np.ndarray, seconds: float) -> dict:
    """Images/s and median ms per call over about `seconds` of repeated calls (at least three)."""
    durations: list[float] = []
    started = time.perf_counter()
    while len(durations) < 3 or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        classifier.predict(batch)
        durations.append(time.perf_counter() - t0)
    return {"batch_size": len(batch), "images_per_s": round(len(batch) * len(durations) / sum(durations), 1),
            "ms_per_batch": round(float(np.median(durations)) * 1000, 3), "calls": len(durations)}


# --- the verdict -------------------------------------------------------------------------------------------


def cuda_blockers(report: dict) -> list[str]:
    """Why CUDA cannot be used here, first cause first (empty: nothing found in the way)."""
    runtime, gpu, driver, libraries = (report["onnxruntime"], report["gpu"], report["cuda_driver"],
                                       report["cuda_libraries"])
    reasons = []
    if CUDA not in runtime["providers"]:
        reasons.append(f"this onnxruntime ({runtime['package']} {runtime['version']}) has no CUDAExecutionProvider: "
                       "install onnxruntime-gpu (and no other onnxruntime package beside it)")
        return reasons
    if not gpu["visible"]:
        if gpu["cuda_visible_devices"] in ("", "-1"):
            reasons.append(f"CUDA_VISIBLE_DEVICES={gpu['cuda_visible_devices']!r} hides every GPU")
        else:
            reasons.append("no GPU is visible (no /dev/nvidia* device nodes; in a container: docker run --gpus all, "
                           "or podman run --device nvidia.com/gpu=all with the NVIDIA Container Toolkit)")
    if not driver.get("loaded"):
        reasons.append(f"the CUDA driver library cannot be loaded ({driver.get('error')}): no NVIDIA driver here")
    elif driver.get("error"):
        reasons.append(f"the CUDA driver does not start: {driver['error']}")
    missing = [lib for lib in libraries.get("libraries", []) if not lib["loaded"] and lib["name"] != "libcuda.so.1"]
    for library in missing:  # (libcuda is the driver, reported above)
        if library.get("found_in_wheels"):
            where = Path(library["found_in_wheels"][0]).parent
            reasons.append(f"{library['name']} is in {where} but not on the loader's path: add that folder to "
                           "LD_LIBRARY_PATH")
    if any(not lib.get("found_in_wheels") for lib in missing):
        reasons.append(", ".join(lib["name"] for lib in missing if not lib.get("found_in_wheels"))
                       + f" cannot be loaded: install onnxruntime-gpu[cuda,cudnn] (the CUDA {runtime['cuda_version']} "
                         "and cuDNN 9 wheels it was built for) or those libraries")
    return reasons


def diagnose(report: dict) -> tuple[int, str]:
    """(exit status, one-line verdict)."""
    device, models, blockers = report["device"], report["models"], report["cuda_blockers"]
    if report.get("error") and report.get("error_kind") == "configuration":
        return EXIT_UNUSABLE, f"unusable: {report['error']}"
    broken = [m["name"] for m in models if not m["finite"]]
    if broken:
        return EXIT_UNUSABLE, f"unusable: {', '.join(broken)} answers with non-finite probabilities here"
    providers = {m["provider"] for m in models}
    on_gpu = bool(providers) and providers <= {CUDA, TENSORRT}
    where = ", ".join(sorted(providers))
    if device == "cuda":
        if on_gpu:
            return EXIT_OK, f"OK: KEEL_DEVICE=cuda and every session runs on {where}"
        reason = blockers[0] if blockers else report.get("error") or "the sessions fell back to the CPU"
        more = f" (and {len(blockers) - 1} more: see 'why not CUDA')" if len(blockers) > 1 else ""
        return EXIT_UNUSABLE, f"unusable: KEEL_DEVICE=cuda but CUDA cannot be used: {reason}{more}"
    if report.get("error"):
        return EXIT_UNUSABLE, f"unusable: {report['error']}"
    if device == "cpu":
        return EXIT_OK, "OK: KEEL_DEVICE=cpu, serving on the CPU"
    if on_gpu:
        return EXIT_OK, f"OK: serving on the GPU: {where}"
    if report["gpu"]["visible"] and CUDA in report["onnxruntime"]["providers"]:
        return EXIT_FALLBACK, ("a GPU is visible but the sessions fell back to the CPU, as the service would without "
                               "a word: " + (blockers[0] if blockers else "see onnxruntime's log above"))
    return EXIT_OK, f"OK: serving on the CPU: {blockers[0] if blockers else 'CUDA is not offered here'}"


def doctor(device: str | None = None, model: str | None = None, seconds: float = 1.0,
           batch_sizes: tuple[int, ...] = BATCH_SIZES) -> dict:
    """The whole report as a dict (what --json prints); `exit_status` and `verdict` at the top level.
    `device` and `model` replace KEEL_DEVICE and KEEL_MODEL / KEEL_MODELS when given."""
    report: dict = {"device": device or os.environ.get("KEEL_DEVICE") or "auto", "cpus": container_cpus(),
                    "onnxruntime": onnxruntime_report(), "gpu": gpu_report(), "cuda_driver": cuda_driver_report(),
                    "cuda_libraries": cuda_libraries_report(), "models": []}
    report["cuda_blockers"] = cuda_blockers(report)
    try:
        config = ServiceConfig.from_env()  # every KEEL_* setting checked as the service checks it
        report["device"] = device = device or config.device
        if device == "cuda" and not report["gpu"]["visible"]:
            # the service refuses to start here, before it loads any model (service/service.py)
            report["models_skipped"] = "KEEL_DEVICE=cuda on a host without a visible GPU: the service does not start"
        else:
            with tempfile.TemporaryDirectory(prefix="keel-doctor-") as scratch:
                for name, path, origin in configured_models(config, model, Path(scratch)):
                    report["models"].append(check_model(name, path, origin, config, device, seconds, batch_sizes))
    except ModelLoadError as exc:
        report.update(error=str(exc), error_kind="model")
    except ValueError as exc:  # a KEEL_* setting, or KEEL_MODELS naming a model twice
        report.update(error=str(exc), error_kind="configuration")
    report["exit_status"], report["verdict"] = diagnose(report)
    return report


# --- output --------------------------------------------------------------------------------------------------


def render(report: dict) -> str:
    runtime, gpu, driver, libraries = (report["onnxruntime"], report["gpu"], report["cuda_driver"],
                                       report["cuda_libraries"])
    lines = [f"Keel doctor: what runs where (KEEL_DEVICE={report['device']}, {report['cpus']} usable CPUs)", ""]

    def row(label: str, text: str) -> None:
        lines.append(f"{label:<15} {text}")

    built = f", built for CUDA {runtime['cuda_version']}" if runtime["cuda_version"] else ", a CPU-only build"
    row("onnxruntime", f"{runtime['version']} ({runtime['package']}{built}) at {runtime['location']}")
    row("", runtime["build"])
    if len(runtime["distributions"]) > 1:
        row("", "installed: " + "; ".join(f"{d['name']} {d['version']} at {d['location']}"
                                          for d in runtime["distributions"]) + " (the one above is imported)")
    row("providers", ", ".join(runtime["providers"]))
    nodes = ", ".join(gpu["device_nodes"]) or "no /dev/nvidia* device nodes"
    row("GPU", ("visible: " if gpu["visible"] else "none visible: ") + nodes)
    nvml = gpu["nvml"]
    if "gpus" in nvml:
        row("", f"driver {nvml['driver']} (CUDA {nvml['cuda_driver_version']}), via NVML")
        for g in nvml["gpus"]:
            row("", f"GPU {g['index']}: {g['name']}, {g['memory_total_mib']} MiB ({g['memory_used_mib']} used), "
                    f"compute capability {g['compute_capability']}")
    else:
        row("", f"NVML: {nvml['error']}")
        smi = gpu.get("nvidia_smi", {})
        for g in smi.get("gpus", []):
            row("", f"nvidia-smi: {g['name']}, driver {g['driver']}, {g['memory_total_mib']} MiB")
        if smi.get("error"):
            row("", smi["error"])
    if not driver.get("loaded"):
        row("CUDA driver", f"not loadable: {driver['error']}")
    else:
        row("CUDA driver", f"{driver['path']}: " + (driver["error"] if driver.get("error") else
                                                     f"CUDA {driver['version']}, {driver['devices']} device(s)"))
    if libraries.get("provider_library"):
        row("CUDA libraries", f"needed by {libraries['provider_library']}:")
        for library in libraries["libraries"]:
            text = library["path"] if library["loaded"] else f"NOT LOADED: {library['error']}"
            if not library["loaded"] and library.get("found_in_wheels"):
                text += f" (a copy: {library['found_in_wheels'][0]})"
            row("", f"  {library['name']:<20} {text}")
        provider = libraries["provider_library_loads"]
        row("", "  the provider library loads" if provider["loaded"] else
            f"  the provider library does not load: {provider['error']}")
    else:
        row("CUDA libraries", libraries.get("note", ""))
    lines.append("")
    if report.get("models_skipped"):
        row("sessions", f"not started: {report['models_skipped']}")
    for m in report["models"]:
        row("model", f"{m['name']}: {m['origin']}; {m['model_name']} ({m['arch']}, {m['precision']}), input "
                     f"{'x'.join(map(str, m['input']))}, version {m['version']}")
        row("session", f"{m['provider']} (asked for {', '.join(m['providers'])}), {m['cpu_threads']} CPU threads, "
                       f"loaded in {m['load_ms']:.0f} ms" + (f", batches padded to {m['batch_buckets']}"
                                                              if m["batch_buckets"] else ""))
        for provider, options in m["provider_options"].items():
            keys = ("device_id", "cudnn_conv_algo_search", "cudnn_conv_use_max_workspace", "arena_extend_strategy",
                    "do_copy_in_default_stream", "use_tf32", "trt_fp16_enable")
            row("", f"{provider}: " + ", ".join(f"{k}={options[k]}" for k in keys if k in options))
        row("warm-up", " | ".join(f"batch {k}: {v:.1f} ms" for k, v in m["warmup_ms"].items()))
        if "max_abs_diff_vs_cpu" in m:
            row("answers", f"vs the CPU provider: max |dp| {m['max_abs_diff_vs_cpu']:.1e}, top-1 agreement "
                           f"{m['top1_agreement_vs_cpu']:.0%}" + ("" if m["finite"] else "; NOT FINITE"))
        elif not m["finite"]:
            row("answers", "NOT FINITE")
        row("throughput", " | ".join(f"batch {t['batch_size']}: {t['images_per_s']:,.0f} images/s "
                                     f"({t['ms_per_batch']:.2f} ms)" for t in m["throughput"]))
        lines.append("")
    if report.get("error"):
        row("error", report["error"])
    if report["device"] != "cpu":
        for reason in report["cuda_blockers"]:
            row("why not CUDA", reason)
    lines += ["", report["verdict"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keel-doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {service.__version__}")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (stdout), nothing else")
    parser.add_argument("--model", help="an .onnx file or BentoML tag to try instead of KEEL_MODEL / KEEL_MODELS")
    parser.add_argument("--device", choices=DEVICES, help="instead of KEEL_DEVICE")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per throughput measurement (default 1)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES), metavar="N",
                        help="batch sizes to warm up and measure (default 1 8 32)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or min(args.batch_sizes) < 1:
        parser.error("--seconds and --batch-sizes must be positive")
    report = doctor(args.device, args.model, args.seconds, tuple(args.batch_sizes))
    print(json.dumps(report, indent=2) if args.json else render(report))
    return report["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
