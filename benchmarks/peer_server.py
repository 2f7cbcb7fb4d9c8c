"""A peer Keel is measured against: the plainest server a user would write without Keel.

A minimal Starlette app with one ONNX Runtime session, per-request inference and no batching,
using Keel's own preprocessing (with the reduced JPEG decode the service uses by default) so only
the serving differs. The blocking work runs in Starlette's thread pool (`run_in_threadpool`),
which is what FastAPI does for a plain `def` endpoint. Served by uvicorn with one worker, or with
several (the benchmark tries both; PEER_THREADS divides ONNX Runtime's threads among them, unset
keeps ONNX Runtime's default):

    PEER_MODEL=artifacts/model.onnx python -m uvicorn benchmarks.peer_server:app --port 8000
    PEER_MODEL=artifacts/model.onnx PEER_THREADS=1 python -m uvicorn benchmarks.peer_server:app --workers 2

It is deliberately naive (no upload cap, minimal error handling): it stands for the baseline in
benchmarks/service_load.py, not for a second way to serve models. Its /upload_only reads the upload
and answers at once: the benchmark's HTTP floor.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.preprocessing import ImageDecodeError, PreprocessSpec, preprocess_bytes

options = ort.SessionOptions()
# PEER_THREADS: ONNX Runtime's threads per worker process (the benchmark divides the CPUs among the
# workers, as Keel does); 0 or unset: ONNX Runtime's default
options.intra_op_num_threads = int(os.environ.get("PEER_THREADS", "0"))
session = ort.InferenceSession(os.environ.get("PEER_MODEL", "artifacts/model.onnx"), options,
                               providers=["CPUExecutionProvider"])
metadata = session.get_modelmeta().custom_metadata_map
spec = PreprocessSpec.from_json(metadata["keel.preprocessing"])
labels = __import__("json").loads(metadata["keel.labels"])


def predict(data: bytes) -> list[dict]:
    probabilities = session.run(None, {"input": preprocess_bytes(data, spec, draft=True)[None]})[0][0]
    best = np.argsort(-probabilities)[:5]
    return [{"label": labels[i], "score": float(probabilities[i])} for i in best]


async def classify(request: Request) -> JSONResponse:
    form = await request.form()
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        return JSONResponse({"error": "no file field 'image'"}, status_code=400)
    try:
        return JSONResponse({"predictions": await run_in_threadpool(predict, await upload.read())})
    except ImageDecodeError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)


async def upload_only(request: Request) -> JSONResponse:
    """Reads the upload as /classify does and answers at once, without decoding or inference: what
    the HTTP exchange alone costs (client, uvicorn, Starlette's multipart parse)."""
    form = await request.form()
    upload = form.get("image")
    size = len(await upload.read()) if upload is not None and not isinstance(upload, str) else 0
    return JSONResponse({"predictions": [{"label": "none", "score": 0.0}], "bytes": size})


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(routes=[Route("/classify", classify, methods=["POST"]),
                        Route("/upload_only", upload_only, methods=["POST"]), Route("/healthz", healthz)])
