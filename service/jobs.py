"""Batch jobs over HTTP: what the service's `@bentoml.task` endpoint `batch` does (service/service.py),
as a function of the service's state (service/core.py).

A job is either a list of uploaded images or a server-side path — a folder (recursive), a
.txt/.csv manifest or one image, read exactly as `python -m service.batch --input` reads it — that
must lie under KEEL_BATCH_ROOT. Clients use BentoML's task routes:
  POST /batch/submit   multipart `images` (one part per image), or JSON {"path": "sub/folder"};
                       optional `model`, `top_k`            -> {"task_id", "status": "in_progress"}
  GET  /batch/status?task_id=...                             -> {"task_id", "status", ...}
  GET  /batch/get?task_id=...                                -> the job's answer (below)
The answer: {"model", "version", "images", "succeeded", "failed", "results": [...], "seconds"},
results in input order, each {"filename"|"path", "predictions"} or {..., "error"}; a job that
cannot run answers {"error"} with a 4xx (and its status is "failed"): 403 for a path outside the
root or with server-side paths disabled, 404 for a missing path or unknown model, 400 otherwise.

Every image goes through the same preprocessing and adaptive batcher as /classify (Keel.preprocess_each,
Keel.infer), so a job's answers are /classify's answers.

Confinement: the requested path is resolved (symlinks and `..` followed) before it is compared
with the resolved root, and so is every file the job then reads, since a symlink inside the root,
or a manifest line, may point anywhere. A path outside is refused whether or not it exists, so
the answer never says what exists outside the root.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from starlette.responses import JSONResponse

from service.batch import BatchInputError, Item, list_inputs, read_file
from service.bentoml_internals import upload_name
from service.config import ServiceConfig
from service.core import Keel
from service.errors import ClientError, EngineUnavailable, error
from service.inference import ModelInfo, decoded, result_rows
from service.uploads import top_k_param

Source = tuple[str, Callable[[], bytes | str]]  # (the name a row reports, read the bytes or say why not)


async def run(keel: Keel, images: list[Path], path: str, model: str, top_k: int | None) -> dict | JSONResponse:
    """A submitted job's answer, or the 4xx/503 JSON error that ends it (the task's status is then failed)."""
    try:
        info = keel.model(model or None)
        k = top_k_param(None if top_k is None else str(top_k)) or keel.config.top_k
        sources, key, refused = plan_job(keel.config, images, path)
        return await run_job(keel, sources, key, info, k, refused)
    except ClientError as exc:
        return error(exc)
    except EngineUnavailable as exc:
        return error(f"{exc}; retry the task later (POST /batch/retry)", exc.status)


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, with symlinks and `..` resolved, is `root` or under it (`root` already resolved)."""
    return path.resolve().is_relative_to(root)


def resolve_under_root(root: str, requested: str) -> Path:
    """The resolved server-side path a job asks for, refused unless it lies under `root`."""
    if not root:
        raise ClientError("server-side paths are disabled on this server (KEEL_BATCH_ROOT is not set); "
                       "upload the images instead", 403)
    if not requested or "\x00" in requested:
        raise ClientError(f"path must be a non-empty path under the batch root, not {requested!r}")
    base = Path(root).resolve()
    target = (base / requested).resolve()  # an absolute `requested` replaces `base` here, then must be under it
    if not target.is_relative_to(base):
        raise ClientError(f"path {requested!r} is outside the batch root", 403)
    if not target.exists():
        raise ClientError(f"path {requested!r}: no such file or folder under the batch root", 404)
    return target


def server_inputs(root: str, requested: str) -> tuple[list[Item], dict[str, str]]:
    """A server-side path's inputs as (reported path, file), and the ones refused (reported path -> why).

    Folder entries are reported relative to the root; manifest entries as written.
    """
    target = resolve_under_root(root, requested)
    base = Path(root).resolve()
    try:
        items = list_inputs(str(target))
    except BatchInputError as exc:
        raise ClientError(str(exc).replace(str(target), requested)) from None
    if target.is_dir():
        items = [(str((target / key).relative_to(base)), path) for key, path in items]
    elif len(items) == 1 and items[0][1] == target:  # a single image
        items = [(str(target.relative_to(base)), target)]
    refused = {key: "outside the batch root" for key, path in items if not inside(path, base)}
    return items, refused


async def run_job(keel: Keel, sources: list[Source], key: str, model: ModelInfo, k: int,
                  refused: dict[str, str] | None = None) -> dict:
    """Classify `sources` in chunks of one batcher batch, decoding chunk i+1 while chunk i is in the
    batcher; rows are {key: name, "predictions"|"error"}, in order."""
    started = time.perf_counter()
    refused = refused or {}

    async def decode(chunk: list[Source]) -> list:
        async def load(name: str, read: Callable[[], bytes | str]) -> bytes | str:
            return refused[name] if name in refused else await asyncio.to_thread(read)

        loaded = await asyncio.gather(*(load(name, read) for name, read in chunk))
        inputs = await keel.preprocess_each([data for data in loaded if isinstance(data, bytes)], model)
        decodes = iter(inputs)
        return [next(decodes) if isinstance(data, bytes) else data for data in loaded]

    size = keel.config.max_batch_size
    chunks = [sources[i:i + size] for i in range(0, len(sources), size)]
    rows: list[dict] = []
    next_decode = asyncio.ensure_future(decode(chunks[0])) if chunks else None
    try:
        for index, chunk in enumerate(chunks):
            inputs = await next_decode
            next_decode = asyncio.ensure_future(decode(chunks[index + 1])) if index + 1 < len(chunks) else None
            batch = decoded(inputs)
            probabilities = await keel.infer(model.name, batch) if batch is not None else []
            rows += result_rows(key, [name for name, _ in chunk], inputs, probabilities, model.labels, k)
    finally:
        if next_decode is not None:
            next_decode.cancel()
    failed = sum("error" in row for row in rows)
    return {"model": model.name, "version": model.version, "images": len(rows), "succeeded": len(rows) - failed,
            "failed": failed, "results": rows, "seconds": round(time.perf_counter() - started, 3)}


def plan_job(config: ServiceConfig, images: list[Path], path: str) -> tuple[list[Source], str, dict[str, str]]:
    """What a submitted job reads: (sources, the row key, refused inputs), or ClientError. Each file is
    read only when its turn comes, and only up to KEEL_MAX_UPLOAD_BYTES."""
    max_bytes = config.max_upload_bytes
    if images and path:
        raise ClientError("send either images or a path, not both")
    if not images and not path:
        raise ClientError("a job needs images (multipart `images` parts) or a server-side `path`")
    if images:
        sources = [(upload_name(p), lambda p=p: read_file(p, max_bytes)) for p in images]
        key, refused = "filename", {}
    else:
        items, refused = server_inputs(config.batch_root, path)
        sources = [(name, lambda p=p: read_file(p, max_bytes)) for name, p in items]
        key = "path"
    if len(sources) > config.job_max_images:
        raise ClientError(f"a job may hold at most {config.job_max_images} images (KEEL_JOB_MAX_IMAGES), "
                       f"this one has {len(sources)}", 413)
    return sources, key, refused
