"""What one HTTP worker serves, and how: the served models, the default one, the configuration, the
worker plan and the engine, in one object.

`Keel.load(config)` builds it from a ServiceConfig; the BentoML service (service/service.py) holds
one per worker, tests and benchmarks/engine_server.py build their own. Every handler takes it
explicitly: the endpoints in service/api.py, the Open Inference Protocol in service/v2.py, the
batch task in service/jobs.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.config import ServiceConfig
from service.engine import Engine, EngineOptions
from service.errors import ClientError, EngineUnavailable
from service.inference import ModelInfo, ModelLoadError, gpu_visible, read_model_info, resolve_model
from service.preprocessing import ImageDecodeError, preprocess_bytes
from service.workers import WorkerPlan, plan_workers

if TYPE_CHECKING:
    from service.uploads import InProgress

log = logging.getLogger("bentoml.keel")


def load_catalogue(config: ServiceConfig) -> tuple[dict[str, tuple[Path, ModelInfo]], str]:
    """Serving name -> (model file, metadata), and the default model's name; ModelLoadError or
    ValueError, naming the model or the setting, when they cannot be served here."""
    if config.device == "cuda" and not gpu_visible():
        raise ModelLoadError("KEEL_DEVICE=cuda requires the GPU, and this host shows none (no /dev/nvidia*); "
                             "unset KEEL_DEVICE to serve on the CPU")
    catalogue: dict[str, tuple[Path, ModelInfo]] = {}
    for name, reference in config.model_refs():
        path = resolve_model(reference)
        info = read_model_info(path)
        name = name or info.name
        if name in catalogue:
            raise ModelLoadError(f"two models are served under the name {name!r}; name them in KEEL_MODELS")
        catalogue[name] = (path, dataclasses.replace(info, name=name))
    default = config.default_model or next(iter(catalogue))
    if default not in catalogue:
        raise ValueError(f"KEEL_DEFAULT_MODEL {default!r} is not a served model ({', '.join(catalogue)})")
    return catalogue, default


@dataclass
class Keel:
    config: ServiceConfig
    models: dict[str, ModelInfo]  # serving name -> metadata (ModelInfo.name is the serving name)
    default_model: str  # what a request that names no model gets
    plan: WorkerPlan
    engine: Engine

    @classmethod
    def load(cls, config: ServiceConfig, plan: WorkerPlan | None = None, in_progress: InProgress | None = None
             ) -> Keel:
        """Read every model's metadata and set up the engine (not started: see `start`). `plan`: the
        worker plan already made (by `bentoml serve`), else made here. `in_progress`: the worker's
        count of requests in progress, when something counts them (the service's RequestGuard): a
        request alone on its worker then skips the batcher's wait."""
        catalogue, default = load_catalogue(config)
        files = {name: path for name, (path, _) in catalogue.items()}
        plan = plan or plan_workers(config, files)
        engine = Engine(files, EngineOptions(device=config.device, cpu_threads=plan.cpu_threads,
                                             tensorrt=config.tensorrt, max_batch_size=config.max_batch_size,
                                             max_latency_ms=config.max_latency_ms,
                                             warmup_delay_s=config.warmup_delay_s),
                        alone=in_progress.alone if in_progress is not None else None)
        return cls(config, {name: info for name, (_, info) in catalogue.items()}, default, plan, engine)

    def start(self, on_error: Callable[[str], None] = log.error) -> Keel:
        """Load and warm up the models on a thread; `ready` turns true when every one is warm."""
        self.engine.start(on_error)
        return self

    @property
    def ready(self) -> bool:
        return self.engine.ready

    def model(self, name: str | None) -> ModelInfo:
        """The served model called `name` (the default one for None), or ClientError 404."""
        if not name:
            return self.models[self.default_model]
        if name not in self.models:
            raise ClientError(f"unknown model {name!r}; served: {', '.join(self.models)}", 404)
        return self.models[name]

    async def preprocess(self, data: bytes, model: ModelInfo) -> np.ndarray:
        """Encoded image -> `model`'s input, or ClientError 400 saying why it is not an image we classify.

        On this worker's event loop when it has no spare CPU for threads (WorkerPlan.decode_on_loop),
        else on a thread (Pillow releases the GIL)."""
        args = (data, model.preprocessing, self.config.max_pixels, self.config.jpeg_draft)
        try:
            if self.plan.decode_on_loop:
                return preprocess_bytes(*args)
            return await asyncio.to_thread(preprocess_bytes, *args)
        except ImageDecodeError as exc:
            raise ClientError(str(exc)) from None

    async def preprocess_each(self, images: list[bytes], model: ModelInfo) -> list[np.ndarray | str]:
        """Each image's model input, or the message saying why it has none: one bad image is one error."""

        async def one(data: bytes) -> np.ndarray | str:
            try:
                return await self.preprocess(data, model)
            except ClientError as exc:
                return str(exc)

        return list(await asyncio.gather(*(one(data) for data in images)))

    async def infer(self, model: str, batch: np.ndarray) -> np.ndarray:
        """N x 3 x S x S float32 (`model`'s preprocessing) -> N x classes probabilities, through the
        model's adaptive batcher, in chunks of at most one batcher batch sent concurrently (so a large
        request shares batches with others, and never exceeds the batch sizes warmed up for).
        EngineUnavailable (503) when the engine cannot answer within KEEL_REQUEST_TIMEOUT_S."""
        if model not in self.models:
            raise KeyError(model)
        size = self.config.max_batch_size
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                if len(batch) <= size:
                    return await self.engine.infer(model, batch)
                chunks = [batch[i:i + size] for i in range(0, len(batch), size)]
                return np.concatenate(await asyncio.gather(*(self.engine.infer(model, chunk) for chunk in chunks)))
        except TimeoutError:
            raise EngineUnavailable(f"no answer within the request timeout of {self.config.request_timeout_s:g} s"
                                    ) from None
        except EngineUnavailable as exc:  # still loading, or shed
            log.warning("inference failed: %s", exc)
            raise
        except Exception as exc:  # a failing session: never a 500, the client may retry
            log.warning("inference failed: %r", exc)
            raise EngineUnavailable(f"inference engine unavailable: {exc}") from None

    def describe(self, name: str) -> dict:
        """What /metadata says of one served model: its metadata, and what it really runs on."""
        config, runtime = self.config, self.engine.describe(name)
        return {
            **self.models[name].to_dict(),
            "provider": runtime["provider"], "providers": runtime["providers"],
            "cpu_threads": runtime["cpu_threads"],
            "batching": {"enabled": config.max_batch_size > 1, "max_batch_size": config.max_batch_size,
                         "max_latency_ms": config.max_latency_ms,
                         "warmed_up_batch_sizes": self.engine.options.warmup_sizes,
                         "padded_to": runtime["batch_buckets"] or [], "warmup_ms": runtime["warmup_ms"]},
            "limits": {"max_upload_bytes": config.max_upload_bytes, "max_pixels": config.max_pixels,
                       "max_batch_images": config.max_batch_images, "jpeg_draft": config.jpeg_draft},
        }

    def describe_service(self) -> dict:
        """What /metadata says of the service as a whole."""
        config = self.config
        return {"workers": self.plan.workers, "decode": "event loop" if self.plan.decode_on_loop else "threads",
                "request_timeout_s": config.request_timeout_s, "max_concurrency": config.max_concurrency,
                "device": config.device, "tensorrt": config.tensorrt}
