"""Export variants on the CPU: fp32 vs int8 (and fp16) speed, beside their accuracy against fp32.

`python -m benchmarks.export_variants [--checkpoint RUN/best.pt] [--quick] --out docs/benchmarks`

Exports the checkpoint with `--fp16 --int8` into a temporary folder (the real export: BN folding,
checks, parity and test-split reports; the accuracy bound is lifted so every variant is measured),
then times each model in one ONNX Runtime session on the CPU provider (the service's
`OnnxClassifier`, default threads) per batch size: ms per call and images/s, each the median of
`repeats` timed runs with min-max (IQR in the JSON). fp16 is timed too, but the CPU provider has no
fp16 kernels and runs it in fp32 between inserted casts, so its CPU number is not what CUDA gives.
Last, the uint8 NHWC-input graph (`--uint8-input`) against the service's float32 path, from crops.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import fmt, spread, time_calls, write_results

NAME = "export_variants"
REPO = Path(__file__).resolve().parents[1]
# Where a checkpoint usually is: `make train` (the quick-start run), else the benchmark runner's own.
CHECKPOINTS = ("runs/quickstart/best.pt", "runs/bench/best.pt")


@dataclass(frozen=True)
class VariantsConfig:
    checkpoint: str = CHECKPOINTS[0]  # a Keel checkpoint whose training data (val/, test/, train/) exists
    data: str | None = None  # ImageFolder root for test/ and train/ when the checkpoint's data moved
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    repeats: int = 7  # timed runs per measurement; the median and its spread are reported
    run_seconds: float = 1.0  # each timed run calls ONNX Runtime for about this long
    calibration_count: int = 256  # int8 calibration images (the export's default)

    @classmethod
    def quick(cls, checkpoint: str, data: str | None) -> VariantsConfig:
        return cls(checkpoint=checkpoint, data=data, batch_sizes=(1, 32), repeats=3, run_seconds=0.1,
                   calibration_count=64)


def run(config: VariantsConfig) -> dict:
    from export.onnx_export import PRECISIONS, ExportConfig, export_checkpoint, variant_path
    from service.inference import OnnxClassifier

    data = Path(config.data) if config.data else None
    export_config = ExportConfig(
        name="keel-bench", fp16=True, int8=True, uint8_input=True, max_accuracy_drop=1.0,  # measure all, refuse none
        calibration_count=config.calibration_count,
        test_images=str(data / "test") if data else None, calibration_images=str(data / "train") if data else None,
        samples=str(data / "val") if data else None,
    )
    log = lambda message: print(f"  {message}", file=sys.stderr)  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory(prefix="keel-bench-variants-") as folder:
        out = Path(folder) / "model.onnx"
        reports = export_checkpoint(config.checkpoint, out, export_config, log=log)
        for precision in PRECISIONS:
            path = variant_path(out, precision)
            classifier = OnnxClassifier(path, device="cpu")
            crop = classifier.info.preprocessing.crop
            report = reports[precision]
            row = {"precision": precision, "size_mib": round(path.stat().st_size / 2**20, 2),
                   "provider": classifier.provider, "speed": []}
            if precision != "fp32":
                row.update(test_top1=report["test"]["top1"], fp32_test_top1=report["test"]["fp32_top1"],
                           top1_delta=report["test"]["top1_delta"], top1_agreement=report["test"]["top1_agreement"],
                           max_abs_diff=report["test"]["max_abs_diff"], test_images=report["test"]["images"])
            for n in config.batch_sizes:
                batch = np.random.default_rng(n).standard_normal((n, 3, crop, crop)).astype(np.float32)
                throughput, latency = [], []
                for _ in range(config.repeats):
                    durations = time_calls(lambda c=classifier, b=batch: c.predict(b), config.run_seconds)
                    throughput.append(n * len(durations) / sum(durations))
                    latency.append(float(np.median(durations)) * 1000)
                row["speed"].append({"batch_size": n, "images_per_s": spread(throughput),
                                     "ms_per_batch": spread(latency)})
                print(f"  {precision} batch {n:3d}: {fmt(row['speed'][-1]['images_per_s'])} images/s", file=sys.stderr)
            rows.append(row)
            del classifier
        uint8_input = bench_uint8_input(out, config)
    return {"config": asdict(config), "variants": rows, "uint8_input": uint8_input}


def bench_uint8_input(out: Path, config: VariantsConfig) -> dict:
    """From centre crops (Pillow images, as the service has them after resize and crop) to
    probabilities: the service's way (numpy normalize to float32 NCHW, then model.onnx) against
    the uint8 NHWC-input graph (the crops' bytes as they are)."""
    import onnxruntime as ort
    from PIL import Image

    from export.onnx_export import UINT8_INPUT_NAME, UINT8_NHWC, variant_path
    from service.inference import OnnxClassifier
    from service.preprocessing import normalize

    classifier = OnnxClassifier(out, device="cpu")
    spec = classifier.info.preprocessing
    session = ort.InferenceSession(str(variant_path(out, UINT8_NHWC)), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    rows = []
    for n in config.batch_sizes:
        crops = [Image.fromarray(rng.integers(0, 256, (spec.crop, spec.crop, 3), dtype=np.uint8)) for _ in range(n)]
        float_path = lambda crops=crops: classifier.predict(np.stack([normalize(c, spec) for c in crops]))  # noqa: E731
        uint8_path = lambda crops=crops: session.run(None, {UINT8_INPUT_NAME: np.stack([np.asarray(c) for c in crops])})  # noqa: E731
        timings = {}
        for name, call in (("float32_ms", float_path), ("uint8_ms", uint8_path)):
            timings[name] = spread([float(np.median(time_calls(call, config.run_seconds))) * 1000
                                    for _ in range(config.repeats)])
        rows.append({"batch_size": n, **timings, "float32_bytes": n * 3 * spec.crop ** 2 * 4,
                     "uint8_bytes": n * 3 * spec.crop ** 2})
        print(f"  crops -> probabilities, batch {n:3d}: float32 {fmt(timings['float32_ms'], 2)} ms, "
              f"uint8 {fmt(timings['uint8_ms'], 2)} ms", file=sys.stderr)
    return {"crop": spec.crop, "rows": rows}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    rows = results["variants"]
    sizes = [s["batch_size"] for s in rows[0]["speed"]]
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        medians = [s["images_per_s"]["median"] for s in row["speed"]]
        low = [s["images_per_s"]["median"] - s["images_per_s"]["min"] for s in row["speed"]]
        high = [s["images_per_s"]["max"] - s["images_per_s"]["median"] for s in row["speed"]]
        ax.bar(np.arange(len(sizes)) + i * width, medians, width, yerr=[low, high], capsize=3, label=row["precision"])
    ax.set_xticks(np.arange(len(sizes)) + width * (len(rows) - 1) / 2, [str(s) for s in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s (CPU, median, min-max)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(results: dict) -> str:
    rows = results["variants"]
    sizes = [s["batch_size"] for s in rows[0]["speed"]]
    lines = [
        "### Export variants on the CPU",
        "",
        f"`python -m export CHECKPOINT --fp16 --int8` on `{results['config']['checkpoint']}`, each model in one "
        f"ONNX Runtime session on the CPU provider. Median of {results['config']['repeats']} runs (min–max). "
        "Accuracy: top-1 on the test split and the largest probability difference from the fp32 model "
        "(the same numbers as each variant's `.parity.json`).",
        "",
        "| precision | MiB | test top-1 (Δ vs fp32) | top-1 agreement | max abs Δp | "
        + " | ".join(f"batch {n}: images/s" for n in sizes) + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(sizes),
    ]
    for row in rows:
        if row["precision"] == "fp32":
            accuracy = f"{rows[1]['fp32_test_top1']:.1%}" if len(rows) > 1 else "—"
            agreement = difference = "—"
        else:
            accuracy = f"{row['test_top1']:.1%} ({100 * row['top1_delta']:+.1f} pt)"
            agreement, difference = f"{row['top1_agreement']:.1%}", f"{row['max_abs_diff']:.1e}"
        speed = " | ".join(fmt(s["images_per_s"], 0) for s in row["speed"])
        lines.append(f"| {row['precision']} | {row['size_mib']} | {accuracy} | {agreement} | {difference} | {speed} |")
    lines += [
        "",
        "fp16 targets the CUDA provider: on the CPU, ONNX Runtime has no fp16 kernels for these ops and runs the "
        "graph in fp32 between inserted casts, so its CPU speed says nothing about the GPU and its accuracy "
        "reflects only the fp16 rounding of the weights.",
        "",
        "![images/s per batch size and precision](benchmarks/export_variants.png)",
        "",
    ]
    if results.get("uint8_input"):
        u8 = results["uint8_input"]
        lines += [
            f"uint8 NHWC input (`--uint8-input`, export only): from {u8['crop']}x{u8['crop']} centre crops to "
            "probabilities, the service's float32 path (numpy normalize, then `model.onnx`) against the graph "
            "that casts, normalizes and transposes itself. ms per batch, median (min–max):",
            "",
            "| batch | float32 path | uint8 graph | bytes sent float32 → uint8 |",
            "|---:|---:|---:|---:|",
        ]
        lines += [f"| {r['batch_size']} | {fmt(r['float32_ms'], 2)} | {fmt(r['uint8_ms'], 2)} | "
                  f"{r['float32_bytes']:,} → {r['uint8_bytes']:,} |" for r in u8["rows"]]
        lines.append("")
    return "\n".join(lines)


def default_checkpoint() -> str:
    given = os.environ.get("KEEL_BENCH_CHECKPOINT")
    if given:
        return given
    return next((c for c in CHECKPOINTS if (REPO / c).is_file()), CHECKPOINTS[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=default_checkpoint(),
                        help="Keel checkpoint (default: $KEEL_BENCH_CHECKPOINT, else the first of "
                             f"{', '.join(CHECKPOINTS)})")
    parser.add_argument("--data", default=os.environ.get("KEEL_BENCH_DATA"),
                        help="ImageFolder root with val/, test/, train/ (default: $KEEL_BENCH_DATA, else the "
                             "checkpoint's training data)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="results folder")
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke checks")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        parser.error(f"{args.checkpoint}: no such checkpoint (make train, or --checkpoint PATH)")
    if args.data and not (Path(args.data) / "test").is_dir():
        parser.error(f"{args.data}: no test/ split to measure the variants' accuracy on")
    config = VariantsConfig.quick(args.checkpoint, args.data) if args.quick else \
        VariantsConfig(checkpoint=args.checkpoint, data=args.data)
    results = {"quick": args.quick, **run(config)}
    path = write_results(args.out, NAME, results)
    plot(results, args.out / f"{NAME}.png")
    print(f"wrote {path} and {NAME}.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
