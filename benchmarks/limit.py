"""The physical limit: what ONNX Runtime and the image pipeline do in-process, with no HTTP at all.

`python -m benchmarks.limit --model artifacts/model.onnx [--quick] --out docs/benchmarks`

- inference: the exported model in one ONNX Runtime session (the service's `OnnxClassifier`, so
  the same threads and providers), per batch size, on ready tensors: images/s and ms per call;
- preprocessing: decode + resize + crop + normalize (`service.preprocessing.preprocess_bytes`)
  per image, for photo-like JPEGs of 500x375 and 1920x1080, and the decode alone; with the full
  JPEG decode and with the reduced (draft) decode the service and batch job use by default
  (KEEL_JPEG_DRAFT);
- the in-process pipeline the service is compared with (benchmarks/service_load.py), with the
  service's default preprocessing: one image at a time (preprocess, then a batch of 1) for
  latency, and the batch job's scheme for throughput (a thread per core preprocessing one chunk
  ahead of ONNX Runtime).
Every number is the median of `repeats` timed runs, with min-max (and the IQR in the JSON).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from benchmarks.common import fmt, spread, time_calls, write_results

NAME = "limit"


@dataclass(frozen=True)
class LimitConfig:
    model: str = "artifacts/model.onnx"  # an exported Keel model
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    repeats: int = 7  # timed runs per measurement; the median and its spread are reported
    run_seconds: float = 1.0  # each inference run calls ONNX Runtime for about this long
    jpeg_sizes: tuple[tuple[int, int], ...] = ((500, 375), (1920, 1080))
    images_per_run: int = 16  # distinct JPEGs preprocessed per preprocessing run
    pipeline_images: int = 256  # images through the in-process pipeline per run
    pipeline_batch: int = 32  # its chunk size, as the batch job and the service's max batch size

    @classmethod
    def quick(cls, model: str) -> LimitConfig:
        return cls(model=model, batch_sizes=(1, 8, 32), repeats=3, run_seconds=0.2, images_per_run=4,
                   pipeline_images=64)


def photo_like(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A JPEG with photo-like content: smooth gradients, overlapping shapes, edges and grain.

    A flat or synthetic-noise image would make JPEG decode unrealistically cheap or expensive;
    this one has the mix of smooth regions and detail that camera photos have (~1.5-2.5 bits/pixel).
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([
        128 + 90 * np.sin(x / width * rng.uniform(2, 5) + rng.uniform(0, 6)),
        128 + 90 * np.cos(y / height * rng.uniform(2, 5) + rng.uniform(0, 6)),
        128 + 60 * np.sin((x + y) / (width + height) * rng.uniform(3, 8)),
    ], axis=-1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    scale = min(width, height)
    for _ in range(40):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.02, 0.25) * scale
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        else:
            points = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.sort(rng.uniform(0, 2 * np.pi, 5))]
            draw.polygon(points, fill=color, outline=(0, 0, 0))
    image = image.filter(ImageFilter.GaussianBlur(1.2))  # lens softness
    grain = rng.normal(0, 8, (height, width, 3))  # sensor noise
    image = Image.fromarray(np.clip(np.asarray(image, np.float32) + grain, 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def bench_inference(classifier, config: LimitConfig) -> list[dict]:
    crop = classifier.info.preprocessing.crop
    rows = []
    for n in config.batch_sizes:
        batch = np.random.default_rng(n).standard_normal((n, 3, crop, crop)).astype(np.float32)
        throughput, latency = [], []
        for _ in range(config.repeats):
            durations = time_calls(lambda b=batch: classifier.predict(b), config.run_seconds)
            throughput.append(n * len(durations) / sum(durations))
            latency.append(float(np.median(durations)) * 1000)
        rows.append({"batch_size": n, "images_per_s": spread(throughput), "ms_per_batch": spread(latency)})
        print(f"  inference batch {n:3d}: {fmt(rows[-1]['images_per_s'])} images/s", file=sys.stderr)
    return rows


def bench_preprocessing(spec, config: LimitConfig) -> list[dict]:
    from service.preprocessing import decode_image, preprocess_bytes

    rows = []
    for width, height in config.jpeg_sizes:
        images = [photo_like(width, height, seed) for seed in range(config.images_per_run)]
        for draft in (False, True):
            full, decode = [], []
            for _ in range(config.repeats):
                t0 = time.perf_counter()
                for data in images:
                    preprocess_bytes(data, spec, draft=draft)
                t1 = time.perf_counter()
                for data in images:
                    decode_image(data, draft_to=spec.resize if draft else None)
                t2 = time.perf_counter()
                full.append((t1 - t0) / len(images) * 1000)
                decode.append((t2 - t1) / len(images) * 1000)
            rows.append({"size": f"{width}x{height}", "jpeg_kib": round(sum(map(len, images)) / len(images) / 1024, 1),
                         "decode": "reduced (draft)" if draft else "full", "ms_per_image": spread(full),
                         "decode_ms_per_image": spread(decode)})
            print(f"  preprocess {width}x{height} {rows[-1]['decode']} decode: {fmt(rows[-1]['ms_per_image'], 2)} "
                  f"ms/image", file=sys.stderr)
    return rows


def bench_pipeline(model: str | Path, images: list[bytes], config: LimitConfig, draft: bool = True) -> dict:
    """Preprocess + inference in one process: the best a server could do with these images.
    `draft`: the reduced JPEG decode, as the service does by default (KEEL_JPEG_DRAFT).

    Each measurement gets ONNX Runtime's better setting: spin-waiting between runs for one image
    at a time (64 px model: 1.51 ms, 1.66 without), no spinning at full throughput, where idle
    threads would spin on the CPUs the decoders need (1,087 images/s spinning, 1,496 not)."""
    from functools import partial

    from service.inference import OnnxClassifier
    from service.preprocessing import preprocess_bytes

    classifier = OnnxClassifier(model, device="auto")
    spec = classifier.info.preprocessing
    preprocess_bytes = partial(preprocess_bytes, draft=draft)
    single = []
    for _ in range(config.repeats):
        durations = time_calls(lambda: classifier.predict(preprocess_bytes(images[0], spec)[None]),
                               config.run_seconds / 2)
        single.append(float(np.median(durations)) * 1000)
    classifier = OnnxClassifier(model, device="auto", spinning=False)

    stream = [images[i % len(images)] for i in range(config.pipeline_images)]
    chunks = [stream[i:i + config.pipeline_batch] for i in range(0, len(stream), config.pipeline_batch)]
    throughput = []
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        def run_once():
            pending = [pool.submit(preprocess_bytes, d, spec) for d in chunks[0]]
            for index in range(len(chunks)):
                tensors = [f.result() for f in pending]
                if index + 1 < len(chunks):  # preprocess the next chunk while this one runs
                    pending = [pool.submit(preprocess_bytes, d, spec) for d in chunks[index + 1]]
                classifier.predict(np.stack(tensors))

        run_once()  # warm-up
        cpu = []
        for _ in range(config.repeats):
            t0, cpu0 = time.perf_counter(), time.process_time()
            run_once()
            throughput.append(len(stream) / (time.perf_counter() - t0))
            cpu.append((time.process_time() - cpu0) / len(stream) * 1000)
    return {"image": "500x375 JPEG", "draft": draft, "single_image_ms": spread(single),
            "images_per_s": spread(throughput), "cpu_ms_per_image": spread(cpu), "batch": config.pipeline_batch,
            "threads": os.cpu_count() or 2, "provider": classifier.provider}


def run(config: LimitConfig) -> dict:
    from service.inference import OnnxClassifier

    classifier = OnnxClassifier(config.model, device="auto")
    info = classifier.info
    print(f"limit: {info.name} {info.version} ({info.arch}, {info.preprocessing.crop}px input) "
          f"on {classifier.provider}", file=sys.stderr)
    inference = bench_inference(classifier, config)
    preprocessing = bench_preprocessing(info.preprocessing, config)
    pipeline = bench_pipeline(config.model, [photo_like(500, 375, seed) for seed in range(8)], config)
    print(f"  pipeline: {fmt(pipeline['images_per_s'])} images/s, single image "
          f"{fmt(pipeline['single_image_ms'], 2)} ms", file=sys.stderr)
    return {
        "config": asdict(config),
        "model": {"name": info.name, "version": info.version, "arch": info.arch,
                  "input": [3, info.preprocessing.crop, info.preprocessing.crop],
                  "size_mib": round(Path(config.model).stat().st_size / 2**20, 1), "provider": classifier.provider},
        "inference": inference, "preprocessing": preprocessing, "pipeline": pipeline,
    }


def render(results: dict) -> str:
    model = results["model"]
    lines = [
        "### The limit: ONNX Runtime and preprocessing in-process",
        "",
        f"Model `{model['name']}` ({model['arch']}, input {'x'.join(map(str, model['input']))}, "
        f"{model['size_mib']} MiB) on {model['provider']}. Median of {results['config']['repeats']} runs "
        "(min–max).",
        "",
        "| batch size | images/s | ms per batch |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r['batch_size']} | {fmt(r['images_per_s'], 0)} | {fmt(r['ms_per_batch'], 2)} |"
              for r in results["inference"]]
    lines += ["", "Preprocessing one photo-like JPEG (decode, resize, centre crop, normalize):", "",
              "| JPEG | size | JPEG decode | ms per image | of which decode |", "|---|---:|---|---:|---:|"]
    lines += [f"| {r['size']} | {r['jpeg_kib']} KiB | {r.get('decode', 'full')} | {fmt(r['ms_per_image'], 2)} "
              f"| {fmt(r['decode_ms_per_image'], 2)} |" for r in results["preprocessing"]]
    p = results["pipeline"]
    lines += ["", f"In-process pipeline on {p['image']}s (the service's yardstick, with its default "
              f"{'reduced' if p.get('draft') else 'full'} JPEG decode): one image at a time "
              f"{fmt(p['single_image_ms'], 2)} ms; at full throughput ({p['threads']} preprocessing threads one "
              f"chunk of {p['batch']} ahead of ONNX Runtime) {fmt(p['images_per_s'], 0)} images/s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.limit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("KEEL_BENCH_MODEL", LimitConfig.model),
                        help="exported .onnx model (default: $KEEL_BENCH_MODEL or %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="results folder")
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke checks")
    args = parser.parse_args(argv)
    if not Path(args.model).is_file():
        parser.error(f"{args.model}: no such model file (make model, or --model PATH)")
    config = LimitConfig.quick(args.model) if args.quick else LimitConfig(model=args.model)
    path = write_results(args.out, NAME, {"quick": args.quick, **run(config)})
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
