"""The service's configuration, in one place: environment variables with safe defaults.

| variable               | default                 | meaning                                              |
|------------------------|-------------------------|------------------------------------------------------|
| KEEL_MODEL             | keel-classifier:latest  | path to an exported .onnx file, or a BentoML model tag |
| KEEL_DEVICE            | auto                    | auto (CUDA when available, else CPU), cuda (required), cpu |
| KEEL_TOP_K             | 5                       | predictions returned when the request does not say    |
| KEEL_MAX_UPLOAD_BYTES  | 20971520 (20 MiB)       | larger request bodies get 413 before any decoding      |
| KEEL_MAX_PIXELS        | 40000000                | larger images (by their header) get 400: decompression bombs |
| KEEL_MAX_BATCH_SIZE    | 32                      | the adaptive batcher's largest batch                  |
| KEEL_MAX_LATENCY_MS    | 5000                    | the batcher's latency budget; requests past it get 503 |
| KEEL_WORKERS           | 1                       | HTTP worker processes (decode + preprocess run there) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from service.inference import DEVICES
from service.preprocessing import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class ServiceConfig:
    model: str = "keel-classifier:latest"  # .onnx path or BentoML model tag
    device: str = "auto"  # auto | cuda | cpu
    top_k: int = 5  # default number of predictions per image
    max_upload_bytes: int = 20 * 1024 * 1024  # 413 above this, checked before decoding
    max_pixels: int = DEFAULT_MAX_PIXELS  # width x height limit, checked from the image header
    max_batch_size: int = 32  # adaptive batching: largest batch sent to ONNX Runtime
    max_latency_ms: int = 5000  # adaptive batching: budget before a request is shed with 503
    workers: int = 1  # HTTP worker processes

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"KEEL_DEVICE must be one of {', '.join(DEVICES)}, not {self.device!r}")
        for name in ("top_k", "max_upload_bytes", "max_pixels", "max_batch_size", "max_latency_ms", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"KEEL_{name.upper()} must be at least 1, not {getattr(self, name)}")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ServiceConfig:
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = env.get(f"KEEL_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = int(raw) if f.type == "int" else raw
            except ValueError:
                raise ValueError(f"KEEL_{f.name.upper()} must be an integer, not {raw!r}") from None
        return cls(**values)
