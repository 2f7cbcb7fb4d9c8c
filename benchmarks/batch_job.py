"""The batch job against its own limits: is it as fast as the slower of decoding and inference?

`python -m benchmarks.batch_job [--model artifacts/model.onnx] [--data data/shapes] [--quick] --out docs/benchmarks`

On each image set (photo-like 500x375 JPEGs, and the shapes data set's PNGs) it measures
- (a) decoding alone: the job's own decode pipeline (`service.batch.decoded_chunks`, all
  workers, chunks in flight), its tensors thrown away;
- (b) inference alone: `OnnxClassifier.predict` over the same images, already decoded, in
  chunks of the batch size;
- the job: `service.batch.run` end to end (listing, decode, inference, top-k, the fsynced
  output), with thread and process decode workers, and several batch sizes;
and reports each job's images/s as a share of min(a, b), the best a pipeline can do when decode
and inference each run at their own full speed; the issue's target is >= 90%. With a full-size
model (`--large-model`, as `make bench` makes) the JPEGs are measured again with it: there
inference, not decoding, is the slower side, as in most deployments. On a CPU-only
machine both sides share the same cores, so that share is bounded well below 100% unless one
side is much cheaper than the other. Every number is the median of `repeats` runs (min-max).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks.common import fmt, spread, write_results
from benchmarks.limit import photo_like
from service import batch
from service.inference import OnnxClassifier, container_cpus
from service.preprocessing import find_images

NAME = "batch_job"
CPUS = container_cpus()
EXECUTOR_PLURALS = {"thread": "threads", "process": "processes"}  # batch.EXECUTORS, for the page


@dataclass(frozen=True)
class BenchConfig:
    model: str = "artifacts/model.onnx"  # an exported Keel model
    data: str = "data/shapes"  # the shapes data set (its test split's PNGs are one image set)
    jpegs: int = 2048  # photo-like 500x375 JPEGs generated for the JPEG set: ~2 s a job, so start-up is amortised
    pngs: int = 512  # shapes PNGs in the PNG set (fewer when the data set has fewer)
    repeats: int = 5  # timed runs per measurement
    batch_sizes: tuple[int, ...] = (8, 32, 128)  # job runs with threads; the default (32) also with processes,
    # and with one ONNX Runtime thread instead of one per CPU
    device: str = "cpu"  # the job's --device; cpu keeps the numbers comparable across machines
    large_model: str = ""  # a full-size model: the first `large_images` JPEGs again with it ("" = skip)
    large_images: int = 256

    @classmethod
    def quick(cls, model: str, data: str) -> BenchConfig:
        return cls(model=model, data=data, jpegs=48, pngs=48, repeats=2, batch_sizes=(32,))


def make_sets(config: BenchConfig, folder: Path) -> dict[str, Path]:
    """The image sets on disk: generated JPEGs, and PNGs copied from the data set when it exists."""
    sets = {}
    jpegs = folder / "jpeg"
    jpegs.mkdir(parents=True)
    for index in range(config.jpegs):
        (jpegs / f"{index:05d}.jpg").write_bytes(photo_like(500, 375, seed=index))
    sets["500x375 JPEG"] = jpegs
    pngs = find_images(Path(config.data) / "test") + find_images(Path(config.data) / "val")
    if pngs:
        target = folder / "png"
        target.mkdir()
        for index, path in enumerate((pngs * (config.pngs // len(pngs) + 1))[:config.pngs]):
            shutil.copy(path, target / f"{index:05d}.png")
        sets["shapes PNG (64x64)"] = target
    return sets


def timed(runs: int, call) -> list[float]:
    """Seconds of `runs` calls, after one untimed call (warm caches, a started pool)."""
    call()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def rate(count: int, seconds: list[float]) -> dict:
    return spread([count / s for s in seconds])


def bench_set(folder: Path, classifier: OnnxClassifier, config: BenchConfig, scratch: Path,
              runs: list[tuple[str, int, int]] | None = None) -> dict:
    """`runs`: the jobs measured, as (executor, batch size, ONNX Runtime threads; 0 = the job's default)."""
    items = batch.list_inputs(str(folder))
    spec = classifier.info.preprocessing
    base = batch.BatchConfig(model=str(classifier.path), input=str(folder), output=str(scratch / "out.jsonl"),
                             device=config.device, progress=False)

    def decode_only(executor_kind: str) -> dict:
        with batch.make_executor(executor_kind, base.workers) as executor:
            def once():
                for _ in batch.decoded_chunks(items, spec, base, executor):
                    pass
            return rate(len(items), timed(config.repeats, once))

    decode = {kind: decode_only(kind) for kind in (batch.EXECUTORS if runs is None else ("thread",))}
    tensors = np.stack([batch.load(path, spec, base.max_pixels, base.jpeg_draft) for _, path in items])

    def infer_once():
        for i in range(0, len(tensors), base.batch_size):
            classifier.predict(tensors[i:i + base.batch_size])

    inference = rate(len(items), timed(config.repeats, infer_once))
    best_decode = max(d["median"] for d in decode.values())
    limit = min(best_decode, inference["median"])
    # When decode and inference share the same CPUs (no GPU), each image costs both sides' CPU
    # time, so no pipeline can beat 1 / (1/a + 1/b); min(a, b) is reachable only when they run on
    # separate hardware (decode on CPU, inference on a GPU).
    shared = best_decode * inference["median"] / (best_decode + inference["median"])

    jobs = []
    if runs is None:
        runs = [("thread", size, 0) for size in config.batch_sizes]
        runs += [("process", base.batch_size, 0), ("thread", base.batch_size, 1)]  # 1: the job's earlier default
    for executor_kind, size, ort_threads in runs:
        job_config = replace(base, executor=executor_kind, batch_size=size, ort_threads=ort_threads)
        seconds = []

        def once(job_config=job_config, seconds=seconds):
            summary = batch.run(job_config, log=lambda message: None)
            seconds.append(summary["seconds"])
        timed(config.repeats, once)
        samples = rate(len(items), seconds[1:])  # the untimed first run excluded
        jobs.append({"executor": executor_kind, "batch_size": size, "workers": base.workers,
                     "ort_threads": batch.inference_threads(job_config), "images_per_s": samples,
                     "share_of_limit": round(samples["median"] / limit, 3),
                     "share_of_shared_cpu_bound": round(samples["median"] / shared, 3)})
    return {"images": len(items), "decode_images_per_s": decode, "inference_images_per_s": inference,
            "limit_images_per_s": limit, "shared_cpu_bound_images_per_s": round(shared, 1), "jobs": jobs}


def run(config: BenchConfig) -> dict:
    classifier = OnnxClassifier(config.model, config.device)
    with tempfile.TemporaryDirectory(prefix="keel-bench-batch-") as tmp:
        sets = make_sets(config, Path(tmp) / "images")
        results = {name: bench_set(folder, classifier, config, Path(tmp)) for name, folder in sets.items()}
        if config.large_model:
            large = OnnxClassifier(config.large_model, config.device)
            folder = Path(tmp) / "images" / "jpeg-large"
            folder.mkdir()
            for path in sorted(sets["500x375 JPEG"].iterdir())[:config.large_images]:
                shutil.copy(path, folder / path.name)
            name = f"500x375 JPEG, full-size model ({large.info.arch} at {large.info.preprocessing.crop} px)"
            results[name] = bench_set(folder, large, config, Path(tmp),
                                      [("thread", 32, 0), ("thread", 32, 1)])
    info = classifier.info
    return {"config": asdict(config), "model": {"name": info.name, "arch": info.arch, "provider": classifier.provider,
                                                "input": [info.preprocessing.crop] * 2},
            "workers": batch.BatchConfig.workers, "sets": results}


def render(results: dict) -> str:
    model = results["model"]
    lines = [
        "### Batch job: throughput against its limits",
        "",
        f"`python -m service.batch` with model `{model['name']}` ({model['arch']}, input "
        f"{'x'.join(map(str, model['input']))}) on {model['provider']}, {results['workers']} decode workers. "
        f"(a) decoding alone with the job's own pipeline, (b) inference alone on decoded tensors, and the "
        f"whole job (listing, decode, inference, fsynced JSONL), in images/s: median of "
        f"{results['config']['repeats']} runs (min–max). *Share* is the job's rate over min(a, b), the issue's "
        f"yardstick (target >= 90%), and over 1 / (1/a + 1/b), the most a pipeline can do when decoding and "
        f"inference share the same CPUs (on CPU-only machines they do; with a GPU, min(a, b) is the bound).",
        "",
    ]
    for name, s in results["sets"].items():
        decode = s["decode_images_per_s"]
        decoding = ", ".join(f"{fmt(rate_, 0)} with {EXECUTOR_PLURALS[kind]}" for kind, rate_ in decode.items())
        lines += [f"**{name}**, {s['images']} images: (a) decoding {decoding}; (b) inference "
                  f"{fmt(s['inference_images_per_s'], 0)}.",
                  f" Shared-CPU bound {s['shared_cpu_bound_images_per_s']:.0f}.",
                  "", "| decoding | batch size | ONNX Runtime threads | images/s | share of min(a, b) "
                      "| share of shared-CPU bound |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {j['workers']} {j['executor']} workers | {j['batch_size']} | {j['ort_threads']} | "
                  f"{fmt(j['images_per_s'], 0)} | {j['share_of_limit']:.0%} | {j['share_of_shared_cpu_bound']:.0%} |"
                  for j in s["jobs"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch_job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("KEEL_BENCH_MODEL", BenchConfig.model),
                        help="exported .onnx model (default: $KEEL_BENCH_MODEL or %(default)s)")
    parser.add_argument("--data", default=os.environ.get("KEEL_BENCH_DATA", BenchConfig.data),
                        help="shapes data set (default: $KEEL_BENCH_DATA or %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="results folder")
    parser.add_argument("--large-model", default=os.environ.get("KEEL_BENCH_LARGE_MODEL", ""),
                        help="a full-size exported model to measure too (default: $KEEL_BENCH_LARGE_MODEL)")
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke checks")
    args = parser.parse_args(argv)
    if not Path(args.model).is_file():
        parser.error(f"{args.model}: no such model file (make model, or --model PATH)")
    config = (BenchConfig.quick(args.model, args.data) if args.quick
              else BenchConfig(model=args.model, data=args.data, large_model=args.large_model))
    results = {"quick": args.quick, **run(config)}
    path = write_results(args.out, NAME, results)
    print(render(results), file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
