"""Keel's HTTP service, read as a spec.

One BentoML service, `Classifier`, in KEEL_WORKERS HTTP worker processes (by default chosen at
start-up from what the models cost, see choose_workers). Each worker decodes and preprocesses
uploads (on its event loop when it has a CPU to itself, else on threads) and holds the engine
(service/engine.py): one ONNX Runtime session per served model (loaded and warmed once, CUDA when
obtained), each behind BentoML's adaptive batcher, which merges concurrent requests for that model
into one N x 3 x S x S batch and splits the N x classes answer back. Models never share a batch.
The engine lives in the worker, not in a second BentoML service: that hop cost more than inference
itself (service/engine.py says how much).

Endpoints (BentoML's /healthz, /livez, /readyz, /metrics, /docs.json stay; /readyz is 503 until
every model is loaded and warmed up):
  POST /classify        one image: multipart field `image`, or a raw image/* body;
                        `top_k`, `model` as query parameters (or multipart fields)
                        -> {"model", "version", "predictions": [{"label", "score"}], "timing_ms"}
  POST /classify_batch  several images, multipart, one file part each (any field name, e.g. `images`)
                        -> {"model", "version", "results": [{"filename", "predictions"} or
                            {"filename", "error"}, ... in upload order], "timing_ms"}
  GET  /metadata        every model: name/version, labels, input size, preprocessing, provider,
                        batching; `?model=NAME` for one; the default model's fields at top level
  /v2/...               the Open Inference Protocol, see service/v2.py
  POST /batch/submit, GET /batch/status, GET /batch/get
                        a batch job (@bentoml.task): uploads or a path under KEEL_BATCH_ROOT,
                        see service/jobs.py; bodies checked first by uploads.TaskUploadGuard
Errors are JSON {"error": "..."}: 400 bad input, 404 unknown model, 413 too large, 415 content
type, 429 too many requests in progress (KEEL_MAX_CONCURRENCY), 503 engine not ready, shedding
load, or past the request timeout (KEEL_REQUEST_TIMEOUT_S).

Interface for code running in the Classifier (v2.py, tasks):
  self.models: dict[str, ModelInfo]     serving name -> metadata (ModelInfo.name is the serving name)
  self.default_model: str               used when a request names no model
  await self.infer(model, batch)        N x 3 x S x S float32, already preprocessed for that model
                                        -> N x classes probabilities, through that model's batcher;
                                        raises KeyError (unknown model), EngineUnavailable (-> 503)
  self.model_or_404(name) / error(...)  helpers for handlers

Configuration: environment variables, all in service/config.py (KEEL_MODEL or KEEL_MODELS pick
the models).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from pathlib import Path

import bentoml
import numpy as np
import onnxruntime as ort
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service import drain, jobs, v2
from service.config import ServiceConfig, bentoml_tracing
from service.engine import Engine
from service.inference import (
    CHEAP_INFERENCE_MS,
    CUDA,
    TENSORRT,
    ModelInfo,
    ModelLoadError,
    auto_workers,
    batch_buckets,
    container_cpus,
    cpu_cost_ms,
    decode_on_loop,
    gpu_visible,
    read_model_info,
    resolve_model,
    select_providers,
    top_k,
)
from service.preprocessing import ImageDecodeError, preprocess_bytes
from service.uploads import TaskUploadGuard, UploadError, read_upload, replace_bentoml_timeout

log = logging.getLogger("bentoml.keel")  # BentoML's server logging shows its own hierarchy at INFO


def load_catalogue(config: ServiceConfig) -> tuple[dict[str, tuple[Path, ModelInfo]], str]:
    """Serving name -> (model file, metadata), and the default model's name.

    Runs at import, which `bentoml serve` does before starting any worker: a missing or foreign
    model is one clear error and a non-zero exit, not workers that fail and get respawned forever.
    """
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


def choose_workers(config: ServiceConfig, catalogue: dict[str, tuple[Path, ModelInfo]]) -> tuple[int, int]:
    """(HTTP workers, ONNX Runtime threads per CPU session): KEEL_WORKERS and KEEL_CPU_THREADS as set, or
    with KEEL_WORKERS=0 (the default) chosen from what the models cost on this machine's CPU, measured
    once in `bentoml serve`'s own process. The workers inherit the choice through their environment."""
    if config.workers:
        return config.workers, config.cpu_threads
    cpus = container_cpus()
    providers = select_providers(config.device, ort.get_available_providers(), gpu_visible(), config.tensorrt)
    if CUDA in providers or TENSORRT in providers:  # one process owns the GPU and batches for it
        workers, costs = 1, "not measured (GPU)"
    else:
        cost = {name: cpu_cost_ms(path) for name, (path, _) in catalogue.items()}
        workers = auto_workers(list(cost.values()), cpus)
        costs = ", ".join(f"{name} {ms:.2f} ms" for name, ms in cost.items())
    threads = config.cpu_threads or (cpus // workers if workers > 1 else 0)  # 0: every CPU, one worker
    log.info("keel: %d HTTP worker(s) with %d ONNX Runtime thread(s) each, decoding uploads on %s; inference per "
             "image on one CPU thread: %s (one worker per CPU below %g ms; KEEL_WORKERS overrides)", workers,
             threads or cpus, "each worker's event loop" if decode_on_loop(workers, cpus) else "threads", costs,
             CHEAP_INFERENCE_MS)
    os.environ.update(KEEL_WORKERS=str(workers), KEEL_CPU_THREADS=str(threads))
    return workers, threads


CONFIG = ServiceConfig.from_env()
JOBS = jobs.JobsConfig.from_env()  # KEEL_BATCH_ROOT, KEEL_JOB_MAX_IMAGES: the `batch` task, service/jobs.py
CATALOGUE, DEFAULT_MODEL = load_catalogue(CONFIG)
# KEEL_DEVICE=cuda on a host without any GPU fails here, with a non-zero exit status. (A GPU that is
# visible but unusable is found by the engine's session, which can only stop the server: exit 0.)
if CONFIG.device == "cuda" and not gpu_visible():
    raise ModelLoadError("KEEL_DEVICE=cuda requires the GPU, and this host shows none (no /dev/nvidia*); "
                         "unset KEEL_DEVICE to serve on the CPU")
WORKERS, CPU_THREADS = choose_workers(CONFIG, CATALOGUE)
DECODE_ON_LOOP = decode_on_loop(WORKERS, container_cpus())  # else on threads, in parallel across the CPUs
BATCHING = CONFIG.max_batch_size > 1  # KEEL_MAX_BATCH_SIZE=1 turns batching off
WARMUP_SIZES = batch_buckets(CONFIG.max_batch_size)  # the sizes the batcher forms on GPU (all of them padded)
# BentoML's per-request timeout (504) is a backstop behind the routes' own, which answer with a clear 503
# first; uploads.RequestDeadline enforces it, as BentoML's own kept every answered request in memory.
TRAFFIC_TIMEOUT_S = CONFIG.request_timeout_s + 10
replace_bentoml_timeout()
drain.close_listener_first()  # SIGTERM: refuse new connections at once, finish those accepted (service/drain.py)


class EngineUnavailable(RuntimeError):
    """The engine could not answer in time (starting, overloaded, restarting): the client may retry (503)."""


def stop_server(message: str) -> None:
    """A model that cannot run where asked (a visible GPU that CUDA cannot use...) must stop the whole
    server with one clear message: BentoML would otherwise respawn this worker forever behind a
    /livez that says alive. The worker's parent is `bentoml serve`'s process manager."""
    log.error("keel: cannot start: %s", message)
    os.kill(os.getppid(), signal.SIGTERM)


async def classify(request: Request) -> JSONResponse:
    return await bentoml.get_current_service().classify(request)


async def classify_batch(request: Request) -> JSONResponse:
    return await bentoml.get_current_service().classify_batch(request)


async def metadata(request: Request) -> JSONResponse:
    return await bentoml.get_current_service().metadata(request)


http = Starlette(routes=[
    Route("/classify", classify, methods=["POST"]),
    Route("/classify_batch", classify_batch, methods=["POST"]),
    Route("/metadata", metadata, methods=["GET"]),
    *v2.routes(CONFIG),  # the Open Inference Protocol (KServe V2) under /v2, see service/v2.py
])


class RequestError(Exception):
    """A request we answer with `status` and {"error": message}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@bentoml.asgi_app(http)
@bentoml.service(name="keel", workers=WORKERS,
                 traffic={"timeout": TRAFFIC_TIMEOUT_S, "max_concurrency": CONFIG.max_concurrency},
                 tracing=bentoml_tracing())  # spans only when a tracing exporter is configured
class Classifier:
    def __init__(self) -> None:
        # Labels and preprocessing come from the model files themselves (read at import).
        self.models: dict[str, ModelInfo] = {name: info for name, (_, info) in CATALOGUE.items()}
        self.default_model = DEFAULT_MODEL
        self.info = self.models[DEFAULT_MODEL]  # the single-model interface, kept for existing callers
        self.engine = Engine(CATALOGUE, CONFIG.device, CPU_THREADS, CONFIG.tensorrt, CONFIG.max_batch_size,
                             CONFIG.max_latency_ms, WARMUP_SIZES, CONFIG.warmup_delay_s)
        self.engine.start(on_error=stop_server)

    async def __is_ready__(self) -> bool:
        """Ready once the engine has loaded and warmed every model; BentoML's /readyz answers 503 until then."""
        return self.engine.ready

    async def infer(self, model: str, batch: np.ndarray) -> np.ndarray:
        """N x 3 x S x S float32 -> N x classes probabilities, through `model`'s adaptive batcher."""
        if model not in self.models:
            raise KeyError(model)
        try:
            async with asyncio.timeout(CONFIG.request_timeout_s):
                return await self.engine.infer(model, batch)
        except TimeoutError:
            raise EngineUnavailable(f"no answer within the request timeout of {CONFIG.request_timeout_s:g} s") from None
        except Exception as exc:  # shed by the batcher, or still loading
            log.warning("inference failed: %r", exc)
            raise EngineUnavailable(f"inference engine unavailable: {exc}") from None

    def model_or_404(self, name: str | None) -> ModelInfo:
        if not name:
            return self.models[self.default_model]
        if name not in self.models:
            raise RequestError(f"unknown model {name!r}; served: {', '.join(self.models)}", 404)
        return self.models[name]

    async def classify(self, request: Request) -> JSONResponse:
        return await answer(self._classify(request, time.perf_counter()))

    async def _classify(self, request: Request, started: float) -> dict:
        model = self.model_or_404(request.query_params.get("model"))  # 404 before reading any upload
        k = top_k_param(request.query_params.get("top_k"))
        upload = await read_upload(request, CONFIG.max_upload_bytes)
        model = self.model_or_404(upload.fields.get("model", model.name))
        k = top_k_param(upload.fields.get("top_k")) if "top_k" in upload.fields else k
        tensor = await self.preprocess(upload.files[0][1], model)
        preprocessed = time.perf_counter()
        probabilities = await self.infer(model.name, tensor[None])
        done = time.perf_counter()
        return {
            "model": model.name, "version": model.version,
            "predictions": top_k(probabilities[0], model.labels, k),
            "timing_ms": {"preprocess": ms(started, preprocessed), "inference": ms(preprocessed, done),
                          "total": ms(started, done)},
        }

    async def classify_batch(self, request: Request) -> JSONResponse:
        return await answer(self._classify_batch(request, time.perf_counter()))

    async def _classify_batch(self, request: Request, started: float) -> dict:
        model = self.model_or_404(request.query_params.get("model"))
        k = top_k_param(request.query_params.get("top_k"))
        upload = await read_upload(request, CONFIG.max_upload_bytes, CONFIG.max_batch_images, None, raw_body=False)
        model = self.model_or_404(upload.fields.get("model", model.name))
        k = top_k_param(upload.fields.get("top_k")) if "top_k" in upload.fields else k
        # Each image on its own: one bad upload is one error entry, not a failed request.
        tensors = await asyncio.gather(*(self.preprocess(data, model, raise_=False) for _, data in upload.files))
        good = [i for i, tensor in enumerate(tensors) if isinstance(tensor, np.ndarray)]
        preprocessed = time.perf_counter()
        probabilities: dict[int, np.ndarray] = {}
        if good:
            # Chunks of at most one batcher batch, sent concurrently: they may share batches with
            # other requests' images, and never exceed what the engine was warmed up for.
            size = CONFIG.max_batch_size
            chunks = [good[i:i + size] for i in range(0, len(good), size)]
            answers = await asyncio.gather(*(self.infer(model.name, np.stack([tensors[i] for i in chunk]))
                                             for chunk in chunks))
            for chunk, result in zip(chunks, answers):
                probabilities.update(zip(chunk, result))
        done = time.perf_counter()
        results = []
        for i, (filename, _) in enumerate(upload.files):
            if i in probabilities:
                results.append({"filename": filename, "predictions": top_k(probabilities[i], model.labels, k)})
            else:
                results.append({"filename": filename, "error": tensors[i]})
        return {
            "model": model.name, "version": model.version, "results": results,
            "timing_ms": {"preprocess": ms(started, preprocessed), "inference": ms(preprocessed, done),
                          "total": ms(started, done)},
        }

    async def preprocess(self, data: bytes, model: ModelInfo, raise_: bool = True) -> np.ndarray | str:
        """Decode + preprocess, on this worker's event loop when it has no spare CPU for threads
        (DECODE_ON_LOOP), else on a thread (Pillow releases the GIL); a bad image raises a 400
        RequestError, or with raise_=False comes back as its error message."""
        args = (data, model.preprocessing, CONFIG.max_pixels, CONFIG.jpeg_draft)
        try:
            return preprocess_bytes(*args) if DECODE_ON_LOOP else await asyncio.to_thread(preprocess_bytes, *args)
        except ImageDecodeError as exc:
            if raise_:
                raise RequestError(str(exc)) from None
            return str(exc)

    async def metadata(self, request: Request) -> JSONResponse:
        try:
            selected = request.query_params.get("model")
            names = [self.model_or_404(selected).name] if selected else list(self.models)
        except RequestError as exc:
            return error(str(exc), exc.status)
        if not self.engine.ready:
            return error("inference engine is still starting; retry later", 503)
        models = {name: self.describe(name) for name in names}
        default = models.get(self.default_model) or next(iter(models.values()))
        return JSONResponse({**default, "default_model": self.default_model, "models": models,
                             "service": {"workers": WORKERS, "decode": "event loop" if DECODE_ON_LOOP else "threads",
                                         "request_timeout_s": CONFIG.request_timeout_s,
                                         "max_concurrency": CONFIG.max_concurrency, "device": CONFIG.device,
                                         "tensorrt": CONFIG.tensorrt}})

    def describe(self, name: str) -> dict:
        runtime = self.engine.describe(name)
        return {
            **self.models[name].to_dict(),
            "provider": runtime["provider"], "providers": runtime["providers"],
            "cpu_threads": runtime["cpu_threads"],
            "batching": {"enabled": BATCHING, "max_batch_size": CONFIG.max_batch_size,
                         "max_latency_ms": CONFIG.max_latency_ms, "warmed_up_batch_sizes": WARMUP_SIZES,
                         "padded_to": runtime["batch_buckets"], "warmup_ms": runtime["warmup_ms"]},
            "limits": {"max_upload_bytes": CONFIG.max_upload_bytes, "max_pixels": CONFIG.max_pixels,
                       "max_batch_images": CONFIG.max_batch_images, "jpeg_draft": CONFIG.jpeg_draft},
        }

    @bentoml.task
    async def batch(self, images: list[Path] = [], path: str = "", model: str = "",  # noqa: B006 (pydantic copies)
                    top_k: int | None = None) -> dict:
        """A batch job, see service/jobs.py: uploaded `images`, or a server-side `path` under
        KEEL_BATCH_ROOT. Submit with POST /batch/submit, poll /batch/status, fetch /batch/get."""
        try:
            info = self.model_or_404(model or None)
            k = top_k_param(None if top_k is None else str(top_k))
            sources, key, refused = jobs.plan_job(JOBS, images, path, CONFIG.max_upload_bytes)
            return await jobs.run_job(sources, key, info, k, lambda data: self.preprocess(data, info, raise_=False),
                                      lambda batch: self.infer(info.name, batch), CONFIG.max_batch_size, refused)
        except (RequestError, jobs.JobError) as exc:
            return error(str(exc), exc.status)
        except EngineUnavailable as exc:
            return error(f"{exc}; retry the task later (POST /batch/retry)", 503, retry=True)


# BentoML parses the batch task's bodies itself (downloading URLs, 500 on bad multipart): checked first.
# An upload job carries at most KEEL_MAX_BATCH_IMAGES images' worth of bytes; bigger jobs use a path.
Classifier.add_asgi_middleware(TaskUploadGuard, paths={"/batch", "/batch/submit"}, file_field="images",
                               max_bytes=CONFIG.max_upload_bytes * CONFIG.max_batch_images,
                               max_files=JOBS.job_max_images)


async def answer(work) -> JSONResponse:
    """The JSON answer of a request handler's coroutine, every failure mapped to a JSON error."""
    try:
        async with asyncio.timeout(CONFIG.request_timeout_s):
            return JSONResponse(await work)
    except RequestError as exc:
        return error(str(exc), exc.status)
    except UploadError as exc:
        return error(str(exc), exc.status)
    except EngineUnavailable as exc:
        return error(f"{exc}; retry later", 503, retry=True)
    except TimeoutError:
        return error(f"request not answered within the timeout of {CONFIG.request_timeout_s:g} s; retry later",
                     503, retry=True)


def top_k_param(raw: str | None) -> int:
    if raw is None:
        return CONFIG.top_k
    try:
        k = int(raw)
        if k < 1:
            raise ValueError
    except ValueError:
        raise RequestError(f"top_k must be a positive integer, not {raw!r}") from None
    return k


def error(message: str, status: int = 400, retry: bool = False) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"Retry-After": "1"} if retry else None)


def ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 2)
