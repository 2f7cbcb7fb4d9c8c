"""Keel's HTTP service, read as a spec.

One BentoML service, `Classifier`, in KEEL_WORKERS HTTP worker processes (by default chosen at
start-up from what the models cost, service/workers.py). Each worker holds the service's state,
`Keel` (service/core.py): the served models, the default one, the configuration and the engine,
which runs one ONNX Runtime session per model behind BentoML's adaptive batcher (service/engine.py).

Endpoints (typed `@bentoml.api` methods: in /docs.json, the Swagger UI at /, and callable with
`bentoml.SyncHTTPClient(url).classify(image=Path("cat.jpg"), top_k=3)`; BentoML's /healthz,
/livez, /readyz, /metrics stay, and /readyz is 503 until every model is loaded and warmed up):
  POST /classify        one image: multipart field `image`, or a raw image/* body; `top_k`, `model`
                        as fields or query parameters
                        -> {"model", "version", "predictions": [{"label", "score"}], "timing_ms"}
  POST /classify_batch  several images, multipart, one file part each (any field name, e.g. `images`)
                        -> {"model", "version", "results": [{"filename", "predictions"} or
                            {"filename", "error"}, ... in upload order], "timing_ms"}
  POST /metadata        every model: name/version, labels, input size, preprocessing, provider,
  (and GET)             batching; `model` (a JSON field, or `?model=NAME`) for one; the default model's
                        fields at the top level
  /v2/...               the Open Inference Protocol, see service/v2.py
  POST /batch/submit, GET /batch/status, GET /batch/get
                        a batch job (@bentoml.task): uploads or a path under KEEL_BATCH_ROOT,
                        see service/jobs.py
Errors are JSON {"error": "..."} (service/errors.py): 400 bad input, 404 unknown model, 413 too large,
415 content type, 429 too many requests in progress (KEEL_MAX_CONCURRENCY), 503 engine not ready,
shedding load, or past the request timeout (KEEL_REQUEST_TIMEOUT_S), with Retry-After.

Requests to the typed endpoints are read by uploads.RequestGuard before BentoML sees them (the
upload cap, raw image bodies, query parameters, no URL fetched, clean 4xx); the batch task's
bodies are checked by uploads.TaskUploadGuard. Configuration: environment variables, all in
service/config.py (KEEL_MODEL or KEEL_MODELS pick the models).
"""

from __future__ import annotations

import logging
import math
import os
import signal
from pathlib import Path

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import api, jobs, v2
from service.api import BatchClassification, Classification, Image, Metadata, ModelName, TopK, answer
from service.bentoml_internals import (
    bentoml_tracing,
    cache_api_methods,
    close_listener_first,
    guarded_api,
    replace_bentoml_timeout,
)
from service.config import ServiceConfig
from service.core import Keel, load_catalogue
from service.uploads import (
    InProgress,
    RequestGuard,
    TaskUploadGuard,
    model_param,
    read_classify,
    read_classify_batch,
    read_metadata,
)
from service.workers import WorkerPlan, hand_down, plan_workers

log = logging.getLogger("bentoml.keel")


def plan_serving(config: ServiceConfig) -> WorkerPlan:
    """What BentoML's decorator needs before any worker starts: how many workers. `bentoml serve` runs
    this when it imports the module: a missing or foreign model, or a bad setting, stops it here with
    one clear error and a non-zero exit (not in workers respawned forever), and with KEEL_WORKERS=0 it
    times the models and hands the choice to the workers (service/workers.py)."""
    catalogue, _ = load_catalogue(config)
    plan = plan_workers(config, {name: path for name, (path, _) in catalogue.items()})
    if not config.workers:
        hand_down(plan)
    return plan


def stop_server(message: str) -> None:
    """A model that cannot run where asked (a visible GPU that CUDA cannot use...) must stop the whole
    server with one clear message: BentoML would otherwise respawn this worker forever behind a
    /livez that says alive. The worker's parent is `bentoml serve`'s process manager."""
    log.error("keel: cannot start: %s", message)
    os.kill(os.getppid(), signal.SIGTERM)


async def metadata_get(request: Request) -> Response:
    """GET /metadata[?model=NAME]: POST /metadata's answer."""
    described = await answer(api.metadata(request.app.state.keel, model_param(request.query_params.get("model"))))
    return described if isinstance(described, Response) else JSONResponse(described.model_dump(mode="json"))


CONFIG = ServiceConfig.from_env()
PLAN = plan_serving(CONFIG)
IN_PROGRESS = InProgress()  # this worker's requests in progress: the guard counts, the engine reads
replace_bentoml_timeout()  # before BentoML assembles the app, see service/bentoml_internals.py
close_listener_first()  # SIGTERM: refuse new connections at once, answer those accepted (bentoml_internals.py)
# GET /metadata and the Open Inference Protocol: plain routes, mounted; they serve `http.state.keel`.
http = Starlette(routes=[Route("/metadata", metadata_get, methods=["GET"]), *v2.routes()])


@bentoml.asgi_app(http)
@bentoml.service(name="keel", workers=PLAN.workers,
                 # BentoML's per-request timeout (504) backs up the routes' own 503 at KEEL_REQUEST_TIMEOUT_S;
                 # KEEL_MAX_CONCURRENCY is kept by the RequestGuard (429 with Retry-After)
                 traffic={"timeout": CONFIG.request_timeout_s + 10},
                 tracing=bentoml_tracing())  # spans only when a tracing exporter is configured
class Classifier:
    """Keel: image classification with ONNX Runtime (CUDA when available, else CPU) and adaptive batching."""

    def __init__(self) -> None:
        self.keel = Keel.load(CONFIG, PLAN, IN_PROGRESS).start(on_error=stop_server)
        http.state.keel = self.keel
        cache_api_methods(self)

    async def __is_ready__(self) -> bool:
        """Ready once every model is loaded and warmed up; BentoML's /readyz answers 503 until then."""
        return self.keel.ready

    @guarded_api(route="/classify", output=Classification)
    async def classify(self, image: Image, top_k: TopK = None, model: ModelName = None) -> Classification | Response:
        """Classify one image: a multipart file field `image` (`curl -F image=@cat.jpg`), or the raw image
        as the body with an image/* content type. `top_k` and `model` may also be query parameters."""
        return await answer(api.classify(self.keel, image, top_k, model))

    @guarded_api(route="/classify_batch", output=BatchClassification)
    async def classify_batch(self, images: list[Image], top_k: TopK = None, model: ModelName = None
                             ) -> BatchClassification | Response:
        """Classify several images, one multipart file part each (any field name), at most
        KEEL_MAX_BATCH_IMAGES: one result per image, in upload order; a bad image is one error entry."""
        return await answer(api.classify_batch(self.keel, images, top_k, model))

    @guarded_api(route="/metadata", output=Metadata)
    async def metadata(self, model: ModelName = None) -> Metadata | Response:
        """The served models (or `model` alone): metadata, preprocessing, the provider each session got,
        batching and limits; the default model's fields also at the top level. GET /metadata too."""
        return await answer(api.metadata(self.keel, model))

    @bentoml.task
    async def batch(self, images: list[Path] = [], path: str = "", model: str = "",  # noqa: B006 (pydantic copies)
                    top_k: int | None = None) -> dict:
        """A batch job, see service/jobs.py: uploaded `images`, or a server-side `path` under
        KEEL_BATCH_ROOT. Submit with POST /batch/submit, poll /batch/status, fetch /batch/get."""
        return await jobs.run(self.keel, images, path, model, top_k)


Classifier.add_asgi_middleware(RequestGuard, config=CONFIG, readers={
    "/classify": read_classify, "/classify_batch": read_classify_batch, "/metadata": read_metadata},
    max_in_progress=math.ceil(CONFIG.max_concurrency / PLAN.workers),  # each worker's share, as BentoML splits it
    in_progress=IN_PROGRESS)
# An upload job carries at most KEEL_MAX_BATCH_IMAGES images' worth of bytes; bigger jobs use a path.
Classifier.add_asgi_middleware(TaskUploadGuard, paths={"/batch", "/batch/submit"}, file_field="images",
                               max_bytes=CONFIG.max_upload_bytes * CONFIG.max_batch_images,
                               max_files=CONFIG.job_max_images)
