"""Keel's HTTP service, read as a spec.

Two BentoML services:
- `InferenceEngine` owns the ONNX Runtime session (loaded once per worker, CUDA when available)
  and exposes one batchable API: BentoML's adaptive batcher merges concurrent requests into one
  N x 3 x S x S batch and splits the N x classes answer back.
- `Classifier` is the public HTTP surface. It decodes and preprocesses each upload in its own
  worker (so the engine only ever sees ready tensors), calls the engine, and post-processes.

Endpoints (BentoML's /healthz, /livez, /readyz, /metrics stay):
  POST /classify   multipart field `image`, or a raw image/* body; query `top_k`
                   -> {"model", "version", "predictions": [{"label", "score"}], "timing_ms"}
  GET  /metadata   model name/version, labels, input size, preprocessing, provider, batching
Errors are JSON {"error": "..."} with a 4xx status for anything the client sent wrong.

Configuration: environment variables, see service/config.py (KEEL_MODEL picks the model).
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp  # BentoML's transport between services
import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.config import ServiceConfig
from service.inference import OnnxClassifier, resolve_model, top_k
from service.preprocessing import ImageDecodeError, preprocess_bytes
from service.uploads import UploadError, read_image

CONFIG = ServiceConfig.from_env()
# Resolved at import, which `bentoml serve` does before starting any worker: a missing model is
# one clear error and a non-zero exit, not workers that fail and get respawned forever.
MODEL_PATH = resolve_model(CONFIG.model)
log = logging.getLogger("bentoml.keel")  # BentoML's server logging shows its own hierarchy at INFO
ENGINE_ATTEMPTS = 3  # see Classifier.infer


@bentoml.service(name="keel-engine", traffic={"timeout": 60})
class InferenceEngine:
    def __init__(self) -> None:
        self.classifier = OnnxClassifier(MODEL_PATH, CONFIG.device)
        info = self.classifier.info
        log.info("serving model %s version %s from %s on %s", info.name, info.version, self.classifier.path,
                 self.classifier.provider)

    # KEEL_MAX_BATCH_SIZE=1 turns batching off: BentoML refuses a batchable API with max_batch_size 1.
    @bentoml.api(batchable=CONFIG.max_batch_size > 1, max_batch_size=max(CONFIG.max_batch_size, 2),
                 max_latency_ms=CONFIG.max_latency_ms)
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """N x 3 x S x S preprocessed float32 -> N x classes probabilities."""
        return self.classifier.predict(batch)

    @bentoml.api
    def provider(self) -> str:
        return self.classifier.provider


async def classify(request: Request) -> JSONResponse:
    return await bentoml.get_current_service().classify(request)


async def metadata(request: Request) -> JSONResponse:
    return await bentoml.get_current_service().metadata()


http = Starlette(routes=[
    Route("/classify", classify, methods=["POST"]),
    Route("/metadata", metadata, methods=["GET"]),
])


@bentoml.asgi_app(http)
@bentoml.service(name="keel", workers=CONFIG.workers, traffic={"timeout": 60})
class Classifier:
    engine = bentoml.depends(InferenceEngine)

    def __init__(self) -> None:
        # Labels and preprocessing come from the model file itself, read once per worker.
        # (The session here only reads metadata; the engine holds the one that runs.)
        self.info = OnnxClassifier(MODEL_PATH, device="cpu").info

    async def classify(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            k = int(request.query_params.get("top_k", CONFIG.top_k))
            if k < 1:
                raise ValueError
        except ValueError:
            return error(f"top_k must be a positive integer, not {request.query_params.get('top_k')!r}")
        try:
            data = await read_image(request, CONFIG.max_upload_bytes)
            tensor = await asyncio.to_thread(preprocess_bytes, data, self.info.preprocessing, CONFIG.max_pixels)
        except UploadError as exc:
            return error(str(exc), exc.status)
        except ImageDecodeError as exc:
            return error(str(exc))
        preprocessed = time.perf_counter()
        try:
            probabilities = await self.infer(tensor[None])
        except Exception as exc:  # overloaded, timed out or restarting: the client may retry
            log.warning("inference failed: %r", exc)
            return error(f"inference engine unavailable, retry later ({type(exc).__name__})", 503)
        done = time.perf_counter()
        return JSONResponse({
            "model": self.info.name,
            "version": self.info.version,
            "predictions": top_k(probabilities[0], self.info.labels, k),
            "timing_ms": {"preprocess": ms(started, preprocessed), "inference": ms(preprocessed, done),
                          "total": ms(started, done)},
        })

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        # BentoML's client to the engine pools keep-alive connections, and under bursts a pooled
        # connection is sometimes already being closed by the engine ("Server disconnected");
        # inference is idempotent, so such a request is sent again on a fresh connection.
        for attempt in range(ENGINE_ATTEMPTS):
            try:
                return await self.engine.to_async.infer(batch)
            except aiohttp.ClientConnectionError:
                if attempt == ENGINE_ATTEMPTS - 1:
                    raise

    async def metadata(self) -> JSONResponse:
        return JSONResponse({
            **self.info.to_dict(),
            "provider": await self.engine.to_async.provider(),
            "batching": {"max_batch_size": CONFIG.max_batch_size, "max_latency_ms": CONFIG.max_latency_ms},
            "limits": {"max_upload_bytes": CONFIG.max_upload_bytes, "max_pixels": CONFIG.max_pixels},
        })


def error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 2)
