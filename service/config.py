"""The service's configuration, in one place: environment variables with safe defaults.

Every field of `ServiceConfig` is read from `KEEL_<FIELD>` (e.g. `max_batch_size` from
KEEL_MAX_BATCH_SIZE); the README's "Service configuration" table lists them with their defaults.
A bad value is one clear error at start-up, naming the variable.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from service.inference import DEVICES
from service.preprocessing import DEFAULT_MAX_PIXELS

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # safe in a URL path (/v2/models/{name}) and a query
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class ServiceConfig:
    model: str = "keel-classifier:latest"  # .onnx path or BentoML model tag; served under its exported name
    models: str = ""  # "name=path_or_tag,name2=...": several models, replaces KEEL_MODEL when set
    default_model: str = ""  # model used when a request names none; "" = the first one
    device: str = "auto"  # auto (CUDA when obtained, else CPU) | cuda (fail at start-up without it) | cpu
    tensorrt: bool = False  # also try ONNX Runtime's TensorRT provider before CUDA (needs TensorRT libraries)
    cpu_threads: int = 0  # intra-op threads per CPU session; 0 = the CPUs this container may use
    top_k: int = 5  # default number of predictions per image
    max_upload_bytes: int = 20 * 1024 * 1024  # 413 above this, checked before decoding
    max_pixels: int = DEFAULT_MAX_PIXELS  # width x height limit, checked from the image header
    max_batch_images: int = 64  # images in one /classify_batch request
    jpeg_draft: bool = True  # reduced-size JPEG decode when the image is >= 2x the resize target
    max_batch_size: int = 32  # adaptive batching: largest batch sent to ONNX Runtime
    max_latency_ms: int = 10000  # adaptive batching: queueing budget before a request is shed with 503
    request_timeout_s: float = 30.0  # per request, decode to answer; past it the client gets 503
    max_concurrency: int = 256  # requests in progress across workers (ceil(N / workers) each); more get 429 at once
    workers: int = 0  # HTTP worker processes (each decodes and infers); 0 = chosen at start-up (service/workers.py)
    warmup_delay_s: float = 0.0  # testing only: hold readiness this much longer after warm-up
    batch_root: str = ""  # the only folder batch jobs may read server-side paths from; "" = such jobs are refused
    job_max_images: int = 10_000  # images in one batch job (the task store keeps its whole answer)

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"KEEL_DEVICE must be one of {', '.join(DEVICES)}, not {self.device!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and f.name not in ("cpu_threads", "workers", "warmup_delay_s") and value <= 0:
                raise ValueError(f"KEEL_{f.name.upper()} must be positive, not {value}")
        if self.cpu_threads < 0 or self.workers < 0 or self.warmup_delay_s < 0:
            raise ValueError("KEEL_CPU_THREADS, KEEL_WORKERS and KEEL_WARMUP_DELAY_S must not be negative")
        if self.batch_root and not Path(self.batch_root).is_dir():
            raise ValueError(f"KEEL_BATCH_ROOT {self.batch_root!r} is not a folder")
        self.model_refs()  # KEEL_MODELS is checked here; KEEL_DEFAULT_MODEL once the models' names are known

    def model_refs(self) -> list[tuple[str | None, str]]:
        """[(serving name, path or tag)], in configuration order. With KEEL_MODEL alone the name is
        None: the model is served under the name in its own metadata."""
        if not self.models.strip():
            return [(None, self.model)]
        refs: list[tuple[str | None, str]] = []
        for item in self.models.split(","):
            name, sep, reference = (part.strip() for part in item.partition("="))
            if not item.strip():
                continue
            if not sep or not reference or not MODEL_NAME.fullmatch(name):
                raise ValueError(f"KEEL_MODELS entries are name=path_or_tag with a name of letters, digits, "
                                 f"'_', '.', '-'; got {item.strip()!r}")
            if any(name == seen for seen, _ in refs):
                raise ValueError(f"KEEL_MODELS names {name!r} twice")
            refs.append((name, reference))
        if not refs:
            raise ValueError("KEEL_MODELS is set but names no model")
        return refs

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ServiceConfig:
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            variable = f"KEEL_{f.name.upper()}"
            raw = env.get(variable)
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = parse(raw, f.type)
            except ValueError:
                raise ValueError(f"{variable} must be {'a number' if f.type != 'bool' else 'true or false'}"
                                 f" ({f.type}), not {raw!r}") from None
        return cls(**values)


def parse(raw: str, kind: str) -> int | float | bool | str:
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "bool":
        if raw.strip().lower() not in _TRUE + _FALSE:
            raise ValueError(raw)
        return raw.strip().lower() in _TRUE
    return raw
