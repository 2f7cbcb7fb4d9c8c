"""Keel's request handling without BentoML: what BentoML's request path costs, measured.

The same pieces as service/service.py's /classify: the service's state built directly
(service.core.Keel), the request read by the same reader as the service's guard
(service.uploads.read_classify), answered by the same handler (service.api.classify). What it
leaves out is BentoML: its middleware (Prometheus metrics, the concurrency limit (429), the request
deadline, tracing and request context, its access log; uvicorn's own is kept, as in the HTTP floor)
and its dispatch to the typed API method. Served by uvicorn with as many workers as Keel chose:

    ENGINE_MODEL=artifacts/model.onnx ENGINE_WORKERS=2 ENGINE_THREADS=1 \
        python -m uvicorn benchmarks.engine_server:app --workers 2

Limits, batching and top-k are Keel's defaults (service/config.py).

A yardstick for benchmarks/service_load.py, not a way to serve models.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import api
from service.config import ServiceConfig
from service.core import Keel
from service.errors import ClientError, EngineUnavailable, error
from service.uploads import InProgress, read_classify

CONFIG = ServiceConfig(model=os.environ.get("ENGINE_MODEL", "artifacts/model.onnx"),
                       workers=int(os.environ.get("ENGINE_WORKERS", "1")),  # uvicorn's --workers
                       cpu_threads=int(os.environ.get("ENGINE_THREADS", "0")))
IN_PROGRESS = InProgress()  # counted here as the service's RequestGuard counts them, for the engine
keel = Keel.load(CONFIG, in_progress=IN_PROGRESS).start(on_error=print)


async def classify(request: Request) -> Response:
    IN_PROGRESS.count += 1
    try:
        result = await api.classify(keel, **await read_classify(request, CONFIG))
    except (ClientError, EngineUnavailable) as exc:
        return error(exc)
    finally:
        IN_PROGRESS.count -= 1
    return JSONResponse(result.model_dump(mode="json"))


async def readyz(request: Request) -> JSONResponse:
    return JSONResponse({"ready": keel.ready}, status_code=200 if keel.ready else 503)


app = Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/readyz", readyz)])
