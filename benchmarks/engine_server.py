"""Keel's request handling without BentoML: what BentoML's request path costs, measured.

The same pieces as service/service.py's /classify: uploads read with service.uploads.read_upload,
decoded with service.preprocessing (on the event loop or on threads, as Keel would decide for this
worker count), batched and run by service.engine.Engine, answered with service.inference.top_k.
What it leaves out is BentoML's middleware: Prometheus metrics, the concurrency limit (429), the
request deadline, tracing and request context, BentoML's access log (uvicorn's own is kept, as in
the HTTP floor). Served by uvicorn with as many workers as Keel chose:

    ENGINE_MODEL=artifacts/model.onnx ENGINE_WORKERS=2 ENGINE_THREADS=1 \
        python -m uvicorn benchmarks.engine_server:app --workers 2

Limits, batching and top-k are Keel's defaults (service/config.py).

A yardstick for benchmarks/service_load.py, not a way to serve models.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.config import ServiceConfig
from service.engine import Engine
from service.inference import batch_buckets, container_cpus, decode_on_loop, read_model_info, top_k
from service.preprocessing import preprocess_bytes
from service.uploads import read_upload

MODEL = Path(os.environ.get("ENGINE_MODEL", "artifacts/model.onnx"))
WORKERS = int(os.environ.get("ENGINE_WORKERS", "1"))  # uvicorn's --workers, for the decode placement
INFO = read_model_info(MODEL)
DEFAULTS = ServiceConfig.from_env({})
DECODE_ON_LOOP = decode_on_loop(WORKERS, container_cpus())
engine = Engine({INFO.name: (MODEL, INFO)}, "cpu", int(os.environ.get("ENGINE_THREADS", "0")), False,
                DEFAULTS.max_batch_size, DEFAULTS.max_latency_ms, batch_buckets(DEFAULTS.max_batch_size))
engine.start(on_error=print)


async def classify(request: Request) -> JSONResponse:
    upload = await read_upload(request, DEFAULTS.max_upload_bytes)
    args = (upload.files[0][1], INFO.preprocessing, DEFAULTS.max_pixels, DEFAULTS.jpeg_draft)
    tensor = preprocess_bytes(*args) if DECODE_ON_LOOP else await asyncio.to_thread(preprocess_bytes, *args)
    probabilities = await engine.infer(INFO.name, tensor[None])
    return JSONResponse({"model": INFO.name, "predictions": top_k(probabilities[0], INFO.labels, DEFAULTS.top_k)})


async def readyz(request: Request) -> JSONResponse:
    return JSONResponse({"ready": engine.ready}, status_code=200 if engine.ready else 503)


app = Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/readyz", readyz)])
