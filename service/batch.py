"""Offline batch inference: `keel-batch --model model.onnx --input DIR --output preds.jsonl`
(or `python -m service.batch`).

Inputs (`--input`): a folder (every image under it, recursively, in sorted order), a manifest of
image paths (`.csv`: the `path` column, or the first column when there is no such header; any
other file: one path per line, `#` comments), `-` for paths on stdin, or a single image.
Manifest paths are relative to the manifest's folder, stdin paths to the working directory.

Output (`--output`, JSONL or CSV by extension or `--format`), one row per input, in input order:
  JSONL  {"path": "...", "predictions": [{"label", "score"}, ...]}   or   {"path": "...", "error": "..."}
  CSV    path,label_1,score_1,...,label_K,score_K,error
`path` is the input as given: relative to the input folder, or as written in the manifest.

A bad file is recorded and the job goes on; the exit status is 1 when any image failed, 2 when
the job could not start (missing model or input, unreadable output). Each chunk of rows is
appended with one write and an fsync, so an interrupted job leaves only whole chunks (plus at
most one partial line, which `--resume` cuts off); `--resume` then skips every input already in
the output.

Engines: `local` decodes and preprocesses in a pool of workers (threads by default: measured
faster here, docs/benchmarks.md) several chunks ahead of batched ONNX Runtime inference, so the
two overlap; `ray` runs the same decode + OnnxClassifier code in Ray Data `map_batches` actors
on a local Ray instance or a cluster (`--ray-address`). Pre/post-processing are the service's
own functions (service/preprocessing.py, service/inference.py).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

import service
from service.inference import (
    ModelLoadError,
    OnnxClassifier,
    container_cpus,
    decoded,
    read_model_info,
    resolve_model,
    result_rows,
)
from service.preprocessing import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, PreprocessSpec, find_images, preprocess_bytes
from service.progress import Progress

FORMATS = ("auto", "jsonl", "csv")
EXECUTORS = ("thread", "process")
ENGINES = ("local", "ray")
MAX_ERRORS_SHOWN = 10  # in the final summary; every error is in the output anyway


class BatchInputError(ValueError):
    """The job cannot start: its input or output is missing or unusable (exit status 2)."""


class EngineError(RuntimeError):
    """The Ray engine failed (cluster unreachable, actors dying); finished chunks stay, --resume goes on (exit 2)."""


@dataclass(frozen=True)
class BatchConfig:
    model: str  # .onnx path or BentoML model tag
    input: str  # folder (recursive), .txt/.csv manifest of image paths, a single image, or "-" (paths on stdin)
    output: str  # .jsonl or .csv file, one row per input, appended chunk by chunk
    format: str = "auto"  # auto (from the output's extension: .csv is CSV, anything else JSONL) | jsonl | csv
    batch_size: int = 32  # images per ONNX Runtime call; measured, docs/benchmarks.md
    workers: int = container_cpus()  # decode/preprocess workers (local engine), Ray actors (ray); one per usable CPU
    executor: str = "thread"  # thread | process: how the local engine decodes; threads measured faster here
    prefetch: int = 4  # chunks decoded ahead of inference, so a slow file never starves ONNX Runtime
    top_k: int = 5  # predictions per image
    device: str = "auto"  # auto | cuda | cpu
    ort_threads: int = 0  # ONNX Runtime intra-op threads (local engine); 0 = every usable CPU, see inference_threads
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images (by their header) become error rows
    jpeg_draft: bool = True  # reduced-size decode of large JPEGs, as the service does (KEEL_JPEG_DRAFT)
    resume: bool = False  # skip inputs already in the output instead of starting it afresh
    engine: str = "local"  # local | ray
    ray_address: str | None = None  # ray engine: None starts a local Ray instance; "auto" or ray://host:10001 joins one
    progress: bool = True  # progress line with images/s and ETA on stderr

    def __post_init__(self):
        for name, allowed in (("format", FORMATS), ("executor", EXECUTORS), ("engine", ENGINES)):
            if getattr(self, name) not in allowed:
                raise BatchInputError(f"--{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        for name in ("batch_size", "workers", "prefetch", "top_k", "max_pixels"):
            if getattr(self, name) < 1:
                raise BatchInputError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.ort_threads < 0:
            raise BatchInputError(f"--ort-threads must be 0 (one per CPU) or more, not {self.ort_threads}")

    @property
    def output_format(self) -> str:
        if self.format != "auto":
            return self.format
        return "csv" if Path(self.output).suffix.lower() == ".csv" else "jsonl"


# --- inputs -------------------------------------------------------------------------------------

Item = tuple[str, Path]  # (the path as reported in the output, the file to read)


def read_manifest(text: str, csv_format: bool) -> list[str]:
    """Paths listed in a manifest: a CSV's `path` column (else its first column), or one per line."""
    if csv_format:
        rows = [row for row in csv.reader(io.StringIO(text)) if row and any(cell.strip() for cell in row)]
        header = [cell.strip().lower() for cell in rows[0]] if rows else []
        column = header.index("path") if "path" in header else 0
        rows = rows[1:] if "path" in header else rows
        return [row[column].strip() for row in rows if len(row) > column and row[column].strip()]
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def list_inputs(source: str, stdin: Iterable[str] | None = None) -> list[Item]:
    """Every input of a job, in order, duplicates dropped (each input is answered exactly once)."""
    if source == "-":
        items = [(p, Path(p)) for p in read_manifest("".join(stdin if stdin is not None else sys.stdin), False)]
    else:
        path = Path(source)
        if path.is_dir():
            items = [(str(p.relative_to(path)), p) for p in find_images(path)]
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            items = [(source, path)]
        elif path.is_file():
            try:
                text = path.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as exc:
                raise BatchInputError(f"{path}: cannot read the manifest ({exc})") from None
            entries = read_manifest(text, path.suffix.lower() == ".csv")
            items = [(entry, path.parent / entry) for entry in entries]
        else:
            raise BatchInputError(f"{path}: no such input folder, manifest or image")
    unique = dict(items)
    if len(unique) < len(items):
        print(f"note: {len(items) - len(unique)} duplicate input paths ignored", file=sys.stderr)
    return list(unique.items())


# --- decoding (runs in worker threads or processes) ---------------------------------------------


def read_file(path: Path, max_bytes: int | None = None) -> bytes | str:
    """A file's bytes, or the one-line reason there are none (an error row, never a failed job)."""
    try:
        if max_bytes is not None and (size := path.stat().st_size) > max_bytes:
            return f"file is {size} bytes, over the limit of {max_bytes}"
        return path.read_bytes()
    except FileNotFoundError:
        return "no such file"
    except IsADirectoryError:
        return "is a directory, not an image"
    except OSError as exc:
        return f"cannot read the file: {exc.strerror or exc}"


def load(path: Path, spec: PreprocessSpec, max_pixels: int, draft: bool) -> np.ndarray | str:
    """The model input for one file, or the one-line reason it has none."""
    data = read_file(path)
    if isinstance(data, str):
        return data
    try:
        return preprocess_bytes(data, spec, max_pixels, draft)
    except Exception as exc:  # one bad file must never stop the job
        return " ".join((str(exc) or type(exc).__name__).split())  # one line, also inside a CSV cell


def load_group(paths: list[Path], spec: PreprocessSpec, max_pixels: int, draft: bool) -> list[np.ndarray | str]:
    """A few files per task: the unit of work for a worker (one pickle round trip per group for processes)."""
    return [load(path, spec, max_pixels, draft) for path in paths]


def inference_threads(config: BatchConfig) -> int:
    """ONNX Runtime's threads for the local engine: `ort_threads`, or by default every usable CPU.

    Decoding and inference share the CPUs here, so the session never spin-waits between runs (see
    run()). Every CPU pays off where inference is the slower side (full-size models), and costs
    little where decoding is; benchmarks/batch_job.py compares them, and docs/benchmarks.md
    (*Design decisions*) has what the choice was worth.
    """
    return config.ort_threads or container_cpus()


def make_executor(kind: str, workers: int) -> Executor:
    if kind == "process":
        import multiprocessing

        # forkserver: a fork of this process would inherit ONNX Runtime's threads mid-flight. The
        # server imports the decoding code once, so each worker forks ready instead of importing it.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["service.batch"])
        return ProcessPoolExecutor(workers, mp_context=context)
    return ThreadPoolExecutor(workers, thread_name_prefix="keel-decode")


def decoded_chunks(items: list[Item], spec: PreprocessSpec, config: BatchConfig,
                   executor: Executor) -> Iterator[tuple[list[Item], list[np.ndarray | str]]]:
    """(chunk, its model inputs or errors), in order, with `prefetch` chunks always being decoded ahead.

    Each chunk is split into `workers` groups so every worker has a share of it; the caller's
    inference on chunk i overlaps the decoding of chunks i+1 .. i+prefetch.
    """
    group = max(1, math.ceil(config.batch_size / config.workers))
    chunks = (items[i:i + config.batch_size] for i in range(0, len(items), config.batch_size))
    pending: deque[tuple[list[Item], list[Future]]] = deque()

    def submit(chunk: list[Item]) -> None:
        paths = [path for _, path in chunk]
        pending.append((chunk, [executor.submit(load_group, paths[i:i + group], spec, config.max_pixels,
                                                    config.jpeg_draft)
                                for i in range(0, len(paths), group)]))

    for chunk in chunks:
        submit(chunk)
        if len(pending) > config.prefetch:
            done, futures = pending.popleft()
            yield done, [item for future in futures for item in future.result()]
    while pending:
        done, futures = pending.popleft()
        yield done, [item for future in futures for item in future.result()]


def classify_chunk(chunk: list[Item], loaded: list[np.ndarray | str], predict: Callable[[np.ndarray], np.ndarray],
                   labels: tuple[str, ...], k: int) -> list[dict]:
    """Output rows for one chunk: one batched inference over the images that decoded."""
    batch = decoded(loaded)
    probabilities = predict(batch) if batch is not None else []
    return result_rows("path", [key for key, _ in chunk], loaded, probabilities, labels, k)


# --- output -------------------------------------------------------------------------------------


class RowWriter:
    """Appends rows chunk by chunk: one write + fsync per chunk, so a crash leaves whole chunks only
    (and at most one torn last line, which resuming cuts off)."""

    def __init__(self, path: Path, fmt: str, k: int, resume: bool):
        self.path, self.format, self.k = path, fmt, k
        self.columns = ["path"] + [f"{name}_{i}" for i in range(1, k + 1) for name in ("label", "score")] + ["error"]
        self.done: set[str] = set()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume and path.exists():
                self.done = self._recover()
            else:
                path.write_bytes(b"")
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise BatchInputError(f"{path}: cannot write the output ({exc.strerror or exc})") from None
        if self.format == "csv" and os.fstat(self.fd).st_size == 0:
            self._append(self._csv_lines([self.columns]))

    def _recover(self) -> set[str]:
        """Paths already answered in an existing output; a torn last line is cut off first."""
        data = self.path.read_bytes()
        whole = data[:data.rfind(b"\n") + 1]
        if len(whole) < len(data):
            with open(self.path, "r+b") as file:
                file.truncate(len(whole))
                os.fsync(file.fileno())
        text = whole.decode("utf-8")
        if self.format == "csv":
            rows = list(csv.reader(io.StringIO(text)))
            if rows and rows[0] != self.columns:
                raise BatchInputError(f"{self.path}: cannot resume, its columns are not {','.join(self.columns)} "
                                      f"(written with another --top-k?)")
            return {row[0] for row in rows[1:] if row}
        done = set()
        for number, line in enumerate(text.splitlines(), 1):
            try:
                done.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                raise BatchInputError(f"{self.path}: cannot resume, line {number} is not a batch-job row") from None
        return done

    def _csv_lines(self, rows: list[list]) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        return buffer.getvalue().encode("utf-8")

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # os.write may write less than asked (signals, huge buffers)
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)

    def write(self, rows: list[dict]) -> None:
        if self.format == "jsonl":
            data = "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")
        else:
            table = []
            for row in rows:
                cells = [row["path"]]
                for rank in range(self.k):
                    prediction = row.get("predictions", [])[rank:rank + 1]
                    cells += [prediction[0]["label"], prediction[0]["score"]] if prediction else ["", ""]
                table.append(cells + [row.get("error", "")])
            data = self._csv_lines(table)
        self._append(data)

    def close(self) -> None:
        os.close(self.fd)


# --- the job ------------------------------------------------------------------------------------


def run(config: BatchConfig, stdin: Iterable[str] | None = None, log=None) -> dict:
    """Classify every input of `config` into its output; returns the summary (also printed)."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    items = list_inputs(config.input, stdin)
    model_path = resolve_model(config.model)
    writer = RowWriter(Path(config.output), config.output_format, config.top_k, config.resume)
    try:
        todo = [item for item in items if item[0] not in writer.done]
        skipped = len(items) - len(todo)
        info = read_model_info(model_path) if config.engine == "ray" else None  # no session on the driver
        classifier = None if config.engine == "ray" else OnnxClassifier(model_path, config.device,
                                                                        inference_threads(config), spinning=False)
        info = info or classifier.info
        where = f"on {classifier.provider}" if classifier else f"on Ray ({config.ray_address or 'local instance'})"
        log(f"classifying {len(todo)} images from {config.input} with {info.name} {info.version} {where}"
            + (f"; {skipped} already in {config.output}, skipped" if skipped else ""))
        progress = Progress(len(todo), "batch", stream=sys.stderr if config.progress else open(os.devnull, "w"))
        counts = {"failed": 0}
        errors: list[dict] = []

        def record(rows: list[dict]) -> None:
            writer.write(rows)
            for row in rows:
                if "error" in row:
                    counts["failed"] += 1
                    if len(errors) < MAX_ERRORS_SHOWN:
                        errors.append(row)
            progress.update(len(rows))

        if config.engine == "ray":
            run_ray(todo, model_path, config, record)
        else:
            with make_executor(config.executor, config.workers) as executor:
                for chunk, loaded in decoded_chunks(todo, info.preprocessing, config, executor):
                    record(classify_chunk(chunk, loaded, classifier.predict, info.labels, config.top_k))
        elapsed = progress.close()
    finally:
        writer.close()
    summary = {"images": len(todo), "succeeded": len(todo) - counts["failed"], "failed": counts["failed"],
               "skipped": skipped, "seconds": round(elapsed, 3),
               "images_per_second": round(len(todo) / elapsed, 1) if elapsed > 0 and todo else None,
               "output": config.output, "errors": errors}
    log(f"done: {summary['images']} images, {summary['succeeded']} succeeded, {summary['failed']} failed"
        + (f", {skipped} skipped (already done)" if skipped else "")
        + (f" in {summary['seconds']} s ({summary['images_per_second']} images/s)" if todo else "")
        + f" -> {config.output}")
    for row in errors:
        log(f"  failed: {row['path']}: {row['error']}")
    if counts["failed"] > len(errors):
        log(f"  ... and {counts['failed'] - len(errors)} more failed; every error is in {config.output}")
    return summary


# --- the Ray engine ------------------------------------------------------------------------------


class RayClassifier:
    """A Ray Data `map_batches` actor: one OnnxClassifier per actor, the local engine's load() and
    classify_chunk() per batch, so its rows are the local engine's rows."""

    def __init__(self, model: bytes, device: str, top_k: int, max_pixels: int, jpeg_draft: bool):
        # The model travels as bytes: on a cluster the driver's file is not on the workers' disks.
        self.folder = tempfile.TemporaryDirectory(prefix="keel-ray-")
        path = Path(self.folder.name) / "model.onnx"
        path.write_bytes(model)
        # One ONNX Runtime thread: each actor holds one CPU and Ray runs one actor per CPU.
        self.classifier = OnnxClassifier(path, device, threads=1)
        self.k, self.max_pixels, self.draft = top_k, max_pixels, jpeg_draft

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chunk = [(str(key), Path(path)) for key, path in zip(batch["key"], batch["path"])]
        info = self.classifier.info
        loaded = [load(path, info.preprocessing, self.max_pixels, self.draft) for _, path in chunk]
        rows = classify_chunk(chunk, loaded, self.classifier.predict, info.labels, self.k)
        return {"row": np.array([json.dumps(row) for row in rows], dtype=object)}


def run_ray(items: list[Item], model_path: Path, config: BatchConfig, record: Callable[[list[dict]], None]) -> None:
    """Classify `items` on Ray Data, handing their rows to `record` chunk by chunk in input order."""
    if not items:
        return
    try:
        import ray
        import ray.data
    except ImportError:
        raise BatchInputError("--engine ray needs Ray: pip install -r requirements/ray.txt") from None
    import logging

    started = not ray.is_initialized()
    if started:
        options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        try:
            if config.ray_address:
                # Workers elsewhere import this package from an uploaded copy of it.
                ray.init(address=config.ray_address, runtime_env={"py_modules": [str(Path(__file__).parent)]},
                         **options)
            else:
                ray.init(num_cpus=config.workers, **options)
        except Exception as exc:  # unreachable address, no local resources: one line, not Ray's traceback
            raise EngineError(f"cannot start or join Ray at {config.ray_address or 'a local instance'}: "
                              f"{' '.join(str(exc).split()) or type(exc).__name__}") from None
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # rows come back in input order, as locally
        context.enable_progress_bars = False  # ours counts images, Ray's would count blocks
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # Absolute paths: Ray workers do not share the driver's working directory.
        dataset = ray.data.from_items([{"key": key, "path": str(path.absolute())} for key, path in items])
        rows = dataset.map_batches(
            RayClassifier, batch_size=config.batch_size, num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=config.workers),
            fn_constructor_kwargs=dict(model=model_path.read_bytes(), device=config.device, top_k=config.top_k,
                                       max_pixels=config.max_pixels, jpeg_draft=config.jpeg_draft),
        )
        try:
            for batch in rows.iter_batches(batch_size=config.batch_size, batch_format="numpy"):
                record([json.loads(row) for row in batch["row"]])
        except ray.exceptions.RayError as exc:
            message = " ".join(str(exc).split())
            raise EngineError(f"the Ray job failed: {message[:500]}") from None
    finally:
        if started:
            ray.shutdown()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keel-batch",
                                description="Classify a folder, a manifest of paths or stdin into JSONL or CSV.")
    p.add_argument("--version", action="version", version=f"%(prog)s {service.__version__}")
    defaults = {f.name: f.default for f in fields(BatchConfig)}
    p.add_argument("--model", required=True, help="exported .onnx file or BentoML model tag")
    p.add_argument("--input", required=True,
                   help="folder (recursive), .txt/.csv manifest of image paths, an image, or - for paths on stdin")
    p.add_argument("--output", required=True, help=".jsonl or .csv file, one row per input")
    p.add_argument("--format", choices=FORMATS, default=defaults["format"],
                   help="output format (default: by extension)")
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="images per inference call")
    p.add_argument("--workers", type=int, default=defaults["workers"],
                   help="decode workers (local engine) or Ray actors (ray engine); default: one per core")
    p.add_argument("--executor", choices=EXECUTORS, default=defaults["executor"], help="decode in threads or processes")
    p.add_argument("--prefetch", type=int, default=defaults["prefetch"], help="chunks decoded ahead of inference")
    p.add_argument("--top-k", type=int, default=defaults["top_k"])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default=defaults["device"])
    p.add_argument("--ort-threads", type=int, default=defaults["ort_threads"],
                   help="ONNX Runtime threads; 0 = one per CPU (shared with decoding)")
    p.add_argument("--max-pixels", type=int, default=defaults["max_pixels"], help="larger images are error rows")
    p.add_argument("--no-jpeg-draft", dest="jpeg_draft", action="store_false",
                   help="always decode JPEGs at full size (the service's KEEL_JPEG_DRAFT=0)")
    p.add_argument("--resume", action="store_true", help="skip inputs already in the output (after an interruption)")
    p.add_argument("--engine", choices=ENGINES, default=defaults["engine"])
    p.add_argument("--ray-address", default=defaults["ray_address"],
                   help="ray engine: a cluster to join (auto, ray://host:10001); default: a local Ray instance")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        summary = run(BatchConfig(**vars(args)))
    except (BatchInputError, ModelLoadError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {args.output} holds every finished chunk; add --resume to continue", file=sys.stderr)
        return 130
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
