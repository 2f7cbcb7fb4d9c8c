"""Batch jobs over HTTP: what the service's `@bentoml.task` endpoint `batch` does (service/service.py).

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

Every image goes through the Classifier's own preprocessing and adaptive batcher (the same calls
as /classify), so a job's answers are /classify's answers.

Confinement: the requested path is resolved (symlinks and `..` followed) before it is compared
with the resolved root, and so is every file the job then reads, since a symlink inside the root,
or a manifest line, may point anywhere. A path outside is refused whether or not it exists, so
the answer never says what exists outside the root.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from service.batch import BatchInputError, Item, list_inputs, read_file
from service.inference import ModelInfo, top_k

# What a job reads an image from: an uploaded file or a server-side one, already checked.
Preprocess = Callable[[bytes], Awaitable["np.ndarray | str"]]  # bytes -> model input, or the error
Infer = Callable[[np.ndarray], Awaitable[np.ndarray]]  # N x 3 x S x S -> N x classes


@dataclass(frozen=True)
class JobsConfig:
    batch_root: str = ""  # KEEL_BATCH_ROOT: the only folder jobs may read server-side paths from; "" = disabled
    job_max_images: int = 10_000  # KEEL_JOB_MAX_IMAGES: per job; the whole answer is kept by the task store

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> JobsConfig:
        env = os.environ if env is None else env
        values: dict = {}
        for f in fields(cls):
            raw = env.get(f"KEEL_{f.name.upper()}", "")
            if raw == "":
                continue
            if f.type == "int":
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ValueError(f"KEEL_{f.name.upper()} must be an integer, not {raw!r}") from None
            else:
                values[f.name] = raw
        config = cls(**values)
        if config.job_max_images < 1:
            raise ValueError(f"KEEL_JOB_MAX_IMAGES must be positive, not {config.job_max_images}")
        if config.batch_root and not Path(config.batch_root).is_dir():
            raise ValueError(f"KEEL_BATCH_ROOT {config.batch_root!r} is not a folder")
        return config


class JobError(ValueError):
    """A job we refuse to run; `status` is the HTTP status of its answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, with symlinks and `..` resolved, is `root` or under it (`root` already resolved)."""
    return path.resolve().is_relative_to(root)


def resolve_under_root(root: str, requested: str) -> Path:
    """The resolved server-side path a job asks for, refused unless it lies under `root`."""
    if not root:
        raise JobError("server-side paths are disabled on this server (KEEL_BATCH_ROOT is not set); "
                       "upload the images instead", 403)
    if not requested or "\x00" in requested:
        raise JobError(f"path must be a non-empty path under the batch root, not {requested!r}")
    base = Path(root).resolve()
    target = (base / requested).resolve()  # an absolute `requested` replaces `base` here, then must be under it
    if not target.is_relative_to(base):
        raise JobError(f"path {requested!r} is outside the batch root", 403)
    if not target.exists():
        raise JobError(f"path {requested!r}: no such file or folder under the batch root", 404)
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
        raise JobError(str(exc).replace(str(target), requested)) from None
    if target.is_dir():
        items = [(str((target / key).relative_to(base)), path) for key, path in items]
    elif len(items) == 1 and items[0][1] == target:  # a single image
        items = [(str(target.relative_to(base)), target)]
    refused = {key: "outside the batch root" for key, path in items if not inside(path, base)}
    return items, refused


def upload_name(path: Path) -> str:
    """The client's file name of a BentoML upload: BentoML stores each part as tempfile's 'tmp' +
    8 random characters + the uploaded base name."""
    name = path.name
    return name[11:] if name.startswith("tmp") and len(name) > 11 else name


async def run_job(sources: list[tuple[str, Callable[[], bytes | str]]], key: str, model: ModelInfo, k: int,
                  preprocess: Preprocess, infer: Infer, chunk_size: int,
                  refused: dict[str, str] | None = None) -> dict:
    """Classify `sources` [(name, read bytes or an error)] in chunks of `chunk_size`, decoding
    chunk i+1 while chunk i is in the batcher; rows are {key: name, "predictions"|"error"}."""
    started = time.perf_counter()
    refused = refused or {}

    async def decode(chunk: list[tuple[str, Callable[[], bytes | str]]]) -> list[np.ndarray | str]:
        async def one(name: str, read: Callable[[], bytes | str]) -> np.ndarray | str:
            if name in refused:
                return refused[name]
            data = await asyncio.to_thread(read)
            return data if isinstance(data, str) else await preprocess(data)

        return await asyncio.gather(*(one(name, read) for name, read in chunk))

    chunks = [sources[i:i + chunk_size] for i in range(0, len(sources), chunk_size)]
    rows: list[dict] = []
    next_decode = asyncio.ensure_future(decode(chunks[0])) if chunks else None
    try:
        for index, chunk in enumerate(chunks):
            loaded = await next_decode
            next_decode = asyncio.ensure_future(decode(chunks[index + 1])) if index + 1 < len(chunks) else None
            good = [i for i, item in enumerate(loaded) if isinstance(item, np.ndarray)]
            probabilities = dict(zip(good, await infer(np.stack([loaded[i] for i in good])))) if good else {}
            for i, (name, _) in enumerate(chunk):
                if i in probabilities:
                    rows.append({key: name, "predictions": top_k(probabilities[i], model.labels, k)})
                else:
                    rows.append({key: name, "error": loaded[i]})
    finally:
        if next_decode is not None:
            next_decode.cancel()
    failed = sum("error" in row for row in rows)
    return {"model": model.name, "version": model.version, "images": len(rows), "succeeded": len(rows) - failed,
            "failed": failed, "results": rows, "seconds": round(time.perf_counter() - started, 3)}


def plan_job(config: JobsConfig, images: list[Path], path: str, max_bytes: int
             ) -> tuple[list[tuple[str, Callable[[], bytes | str]]], str, dict[str, str]]:
    """What a submitted job reads: (sources, the row key, refused inputs), or JobError."""
    if images and path:
        raise JobError("send either images or a path, not both")
    if not images and not path:
        raise JobError("a job needs images (multipart `images` parts) or a server-side `path`")
    if images:
        sources = [(upload_name(p), lambda p=p: read_file(p, max_bytes)) for p in images]
        key, refused = "filename", {}
    else:
        items, refused = server_inputs(config.batch_root, path)
        sources = [(name, lambda p=p: read_file(p, max_bytes)) for name, p in items]
        key = "path"
    if len(sources) > config.job_max_images:
        raise JobError(f"a job may hold at most {config.job_max_images} images (KEEL_JOB_MAX_IMAGES), "
                       f"this one has {len(sources)}", 413)
    return sources, key, refused
