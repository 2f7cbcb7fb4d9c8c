"""Offline batch inference: `python -m service.batch --model model.onnx --input DIR --output preds.jsonl`.

Every image under DIR (recursively) gets one JSON line, in sorted path order:
  {"path": "...", "predictions": [{"label", "score"}, ...]}   or   {"path": "...", "error": "..."}
A bad file is recorded and the job goes on; the exit status is 1 when any image failed.
Decoding and preprocessing run in a thread pool (Pillow releases the GIL while it decodes and
resizes) one chunk ahead of ONNX Runtime, so the two overlap. Pre/post-processing are the
service's own functions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.inference import ModelLoadError, OnnxClassifier, resolve_model, top_k
from service.preprocessing import DEFAULT_MAX_PIXELS, PreprocessSpec, find_images, preprocess_bytes
from service.progress import Progress


@dataclass(frozen=True)
class BatchConfig:
    model: str  # .onnx path or BentoML model tag
    input: str  # folder, searched recursively for images
    output: str  # JSONL file, one line per image
    batch_size: int = 32  # images per ONNX Runtime call
    workers: int = os.cpu_count() or 2  # decode/preprocess threads
    top_k: int = 5
    device: str = "auto"  # auto | cuda | cpu
    max_pixels: int = DEFAULT_MAX_PIXELS


def load(path: Path, spec: PreprocessSpec, max_pixels: int) -> np.ndarray | str:
    """The model input for one file, or the reason it has none."""
    try:
        return preprocess_bytes(path.read_bytes(), spec, max_pixels)
    except Exception as exc:  # one bad file must never stop the job
        return str(exc) or type(exc).__name__


def run(config: BatchConfig) -> dict:
    root = Path(config.input)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such input folder")
    classifier = OnnxClassifier(resolve_model(config.model), config.device)
    spec, labels = classifier.info.preprocessing, classifier.info.labels
    paths = find_images(root)
    print(f"classifying {len(paths)} images under {root} with {classifier.info.name} "
          f"{classifier.info.version} on {classifier.provider}", file=sys.stderr)

    chunks = [paths[i:i + config.batch_size] for i in range(0, len(paths), config.batch_size)]
    progress = Progress(len(paths), "batch")
    failed = 0
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(config.workers) as pool, open(output, "w") as out:
        submit = lambda chunk: [pool.submit(load, p, spec, config.max_pixels) for p in chunk]  # noqa: E731
        pending = submit(chunks[0]) if chunks else []
        for index, chunk in enumerate(chunks):
            loaded = [future.result() for future in pending]
            pending = submit(chunks[index + 1]) if index + 1 < len(chunks) else []  # decode ahead
            good = [i for i, item in enumerate(loaded) if isinstance(item, np.ndarray)]
            probabilities = classifier.predict(np.stack([loaded[i] for i in good])) if good else []
            answers = dict(zip(good, probabilities))
            for i, path in enumerate(chunk):
                row = {"path": str(path.relative_to(root))}
                if i in answers:
                    row["predictions"] = top_k(answers[i], labels, config.top_k)
                else:
                    row["error"] = loaded[i]
                    failed += 1
                out.write(json.dumps(row) + "\n")
            out.flush()
            progress.update(len(chunk))
    elapsed = progress.close()
    summary = {"images": len(paths), "failed": failed, "seconds": round(elapsed, 2),
               "images_per_second": round(len(paths) / elapsed, 1) if elapsed > 0 else None, "output": str(output)}
    print(f"done: {summary['images']} images, {failed} failed, {summary['images_per_second']} images/s "
          f"-> {output}", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.batch", description="Classify every image under a folder.")
    parser.add_argument("--model", required=True, help="exported .onnx file or BentoML model tag")
    parser.add_argument("--input", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--output", required=True, help="JSONL file to write, one line per image")
    parser.add_argument("--batch-size", type=int, default=BatchConfig.batch_size)
    parser.add_argument("--workers", type=int, default=BatchConfig.workers, help="decode threads")
    parser.add_argument("--top-k", type=int, default=BatchConfig.top_k)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default=BatchConfig.device)
    args = parser.parse_args(argv)
    try:
        summary = run(BatchConfig(**vars(args)))
    except (FileNotFoundError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
