"""Keel's own endpoints, as functions of the service's state (service/core.py) and typed arguments:
what /classify, /classify_batch and /metadata answer, and the answers' types, which /docs.json shows.

The BentoML service (service/service.py) calls these from its typed API methods; the request has been
read by then (service/uploads.py). They raise ClientError or EngineUnavailable; `answer` turns those
into the JSON error response.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from service.core import Keel
from service.errors import ClientError, EngineUnavailable, error
from service.inference import decoded, result_rows
from service.inference import top_k as best
from service.uploads import ImageFile

T = TypeVar("T")

# --- arguments ---------------------------------------------------------------------------------------------

Image = Annotated[ImageFile, Field(description="the image, encoded (JPEG, PNG, WebP, GIF, BMP, TIFF, ...)")]
TopK = Annotated[int | None, Field(description="how many predictions, best first (default: KEEL_TOP_K, 5)",
                                   ge=1, examples=[3])]
ModelName = Annotated[str | None, Field(description="a served model's name (default: the default model; "
                                                    "see /metadata)", examples=["keel-classifier"])]

# --- answers -----------------------------------------------------------------------------------------------


class Prediction(BaseModel):
    label: str = Field(examples=["star"])
    score: float = Field(ge=0, le=1, description="the model's probability for the label", examples=[0.982611])


class Timing(BaseModel):
    """Milliseconds the server spent: decoding and preprocessing, inference (queueing in the adaptive
    batcher included), and both."""

    preprocess: float
    inference: float
    total: float


PREDICTIONS = [{"label": "star", "score": 0.982611}, {"label": "cross", "score": 0.00914},
               {"label": "triangle", "score": 0.002797}]
TIMING = {"preprocess": 0.61, "inference": 1.38, "total": 1.99}


class Classification(BaseModel):
    """One image's best predictions."""

    model_config = ConfigDict(json_schema_extra={"example": {
        "model": "keel-classifier", "version": "3f1c0a9d2b7e", "predictions": PREDICTIONS, "timing_ms": TIMING}})

    model: str = Field(description="the model's serving name", examples=["keel-classifier"])
    version: str = Field(description="the model's version: its checkpoint's sha256, first 12 hex digits",
                         examples=["3f1c0a9d2b7e"])
    predictions: list[Prediction]
    timing_ms: Timing


class ImageResult(BaseModel):
    """One uploaded image's answer: its predictions, or the error that kept it from having any (the
    other key is left out)."""

    filename: str = Field(description="the uploaded file's name", examples=["cat.jpg"])
    predictions: list[Prediction] | None = Field(None, exclude_if=lambda value: value is None)
    error: str | None = Field(None, exclude_if=lambda value: value is None, description=(
        "why this image has no predictions"), examples=["not a recognised image format (UnidentifiedImageError)"])


class BatchClassification(BaseModel):
    """Every uploaded image's predictions, in upload order; an image that cannot be classified is an
    error entry, and the others are still answered."""

    model_config = ConfigDict(json_schema_extra={"example": {
        "model": "keel-classifier", "version": "3f1c0a9d2b7e", "timing_ms": TIMING, "results": [
            {"filename": "a.jpg", "predictions": PREDICTIONS},
            {"filename": "notes.txt", "error": "not a recognised image format (UnidentifiedImageError)"}]}})

    model: str = Field(examples=["keel-classifier"])
    version: str = Field(examples=["3f1c0a9d2b7e"])
    results: list[ImageResult]
    timing_ms: Timing


class Batching(BaseModel):
    enabled: bool
    max_batch_size: int
    max_latency_ms: int
    warmed_up_batch_sizes: list[int]
    padded_to: list[int] = Field(description="the batch sizes a GPU session pads batches to (none on the CPU)")
    warmup_ms: dict[str, float]


class Limits(BaseModel):
    max_upload_bytes: int
    max_pixels: int
    max_batch_images: int
    jpeg_draft: bool


class ModelDescription(BaseModel):
    """A served model: its metadata (from the model file), and what its session really runs on."""

    name: str
    version: str
    arch: str
    labels: list[str]
    input_size: list[int]
    preprocessing: dict = Field(description="resize, crop, mean, std, interpolation, channel order, layout, dtype")
    checkpoint_sha256: str
    exported_at: str
    metrics: dict = Field(description="the exported checkpoint's training metrics")
    precision: str
    stability: dict = Field(description="the training run's stability report")
    provider: str = Field(description="the ONNX Runtime execution provider the session got",
                          examples=["CPUExecutionProvider"])
    providers: list[str]
    cpu_threads: int
    batching: Batching
    limits: Limits


class ServiceDescription(BaseModel):
    workers: int
    decode: str = Field(description='where uploads are decoded: "event loop" or "threads"')
    request_timeout_s: float
    max_concurrency: int
    device: str
    tensorrt: bool


class Metadata(ModelDescription):
    """Every served model (or the one asked for), the default model's fields also at the top level."""

    default_model: str
    models: dict[str, ModelDescription]
    service: ServiceDescription


# --- the endpoints -----------------------------------------------------------------------------------------


async def classify(keel: Keel, image: ImageFile, top_k: int | None = None, model: str | None = None
                   ) -> Classification:
    info = keel.model(model)
    started = time.perf_counter()
    tensor = await keel.preprocess(image.data, info)
    preprocessed = time.perf_counter()
    probabilities = await keel.infer(info.name, tensor[None])
    done = time.perf_counter()
    return Classification(model=info.name, version=info.version,
                          predictions=best(probabilities[0], info.labels, top_k or keel.config.top_k),
                          timing_ms=timing(started, preprocessed, done))


async def classify_batch(keel: Keel, images: list[ImageFile], top_k: int | None = None, model: str | None = None
                         ) -> BatchClassification:
    info = keel.model(model)
    started = time.perf_counter()
    inputs = await keel.preprocess_each([image.data for image in images], info)
    preprocessed = time.perf_counter()
    batch = decoded(inputs)
    probabilities = await keel.infer(info.name, batch) if batch is not None else []
    done = time.perf_counter()
    results = result_rows("filename", [image.filename for image in images], inputs, probabilities, info.labels,
                          top_k or keel.config.top_k)
    return BatchClassification(model=info.name, version=info.version, results=results,
                               timing_ms=timing(started, preprocessed, done))


async def metadata(keel: Keel, model: str | None = None) -> Metadata:
    names = [keel.model(model).name] if model else list(keel.models)
    if not keel.ready:
        raise EngineUnavailable("inference engine is still starting")
    models = {name: keel.describe(name) for name in names}
    default = models.get(keel.default_model) or next(iter(models.values()))
    return Metadata.model_validate({**default, "default_model": keel.default_model, "models": models,
                                    "service": keel.describe_service()})


async def answer(work: Awaitable[T]) -> T | JSONResponse:
    """The endpoint's answer, or the JSON error it ended in."""
    try:
        return await work
    except (ClientError, EngineUnavailable) as exc:
        return error(exc)


def timing(started: float, preprocessed: float, done: float) -> Timing:
    ms = lambda start, end: round((end - start) * 1000, 2)  # noqa: E731
    return Timing(preprocess=ms(started, preprocessed), inference=ms(preprocessed, done), total=ms(started, done))
