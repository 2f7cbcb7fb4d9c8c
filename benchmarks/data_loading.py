"""Training data loading: images/s of 224 px random crops from photo-sized JPEGs, before and after #16.

*Before* is training/data.py as it was at BEFORE (read from git history, so it stays measurable
after the change): full-size decode, float32 normalisation in the workers, and workers started
afresh every epoch. *After* is the current loader: a reduced-size JPEG decode bounded by the
smallest crop, uint8 from persistent workers, normalisation in the training process
(`DeviceBatches`: on the GPU when there is one; here, on the CPU, it is counted).

Each measurement iterates a DataLoader over a folder of generated photographs (smooth gradients,
blurred shapes, sensor noise; JPEG quality 90) for a few epochs, with the training defaults (batch
64, one worker per CPU) and also in one process (`--workers 0`, the per-image cost alone). Before
and after alternate, so a machine that changes speed affects both alike; each number is the median
over repeats. `python -m benchmarks.data_loading [--quick] --out DIR` -> DIR/data_loading.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from benchmarks.common import fmt, spread, write_results

NAME = "data_loading"
BEFORE = "f337699"  # main when #16's loader changes branched off
REPO = Path(__file__).resolve().parents[1]
SIZES = ((500, 375), (1920, 1080))
CROP, BATCH = 224, 64


def photo(width: int, height: int, seed: int):
    """A photograph stand-in: smooth colour gradients, blurred shapes of every size, sensor noise
    (tests/test_preprocessing.py uses it too)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([128 + 100 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in (0, 1, 2)], -1)
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(width // 40, width // 6)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    image = image.filter(ImageFilter.GaussianBlur(width / 800))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def make_folder(root: Path, size: tuple[int, int], count: int) -> Path:
    """`count` JPEGs of `size` in two class folders (distinct images, so no cache helps)."""
    for index in range(count):
        folder = root / "train" / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        photo(*size, seed=index).save(folder / f"{index:04}.jpg", "JPEG", quality=90)
    return root


def module_before() -> types.ModuleType | None:
    """training/data.py at BEFORE, from git, as a module (None where there is no git history)."""
    result = subprocess.run(["git", "show", f"{BEFORE}:training/data.py"], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        return None
    module = types.ModuleType("data_before")
    exec(compile(result.stdout, f"training/data.py@{BEFORE}", "exec"), module.__dict__)
    return module


def loader_before(module, root: Path, scale: float, workers: int):
    import torch

    from service.preprocessing import PreprocessSpec

    spec = PreprocessSpec(resize=256, crop=CROP)
    dataset = module.ImageFolder(root / "train", module.find_classes(root / "train"), spec, True, scale)
    # make_loader at BEFORE: a fresh set of workers every epoch, float32 tensors
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=False,
                                         num_workers=workers, generator=torch.Generator().manual_seed(0))
    return lambda epoch: (len(targets) for _, targets in loader)


def loader_after(root: Path, scale: float, workers: int):
    import torch

    from service.preprocessing import PreprocessSpec
    from training.augment import ImageAugment
    from training.data import DeviceBatches, EpochSampler, ImageFolder, UnreadableImages, find_classes, make_loader

    spec = PreprocessSpec(resize=256, crop=CROP)
    dataset = ImageFolder(root / "train", find_classes(root / "train"), spec, ImageAugment(CROP, (scale, 1.0)))
    batches = DeviceBatches(make_loader(dataset, BATCH, workers, EpochSampler(len(dataset), 0)), spec,
                            torch.device("cpu"), UnreadableImages("skip", None), "train")

    def epoch(number: int):
        batches.set_epoch(number)
        return (len(targets) for _, targets in batches)

    return epoch


def images_per_second(epoch_fn, epochs: int) -> float:
    started, images = time.perf_counter(), 0
    for number in range(1, epochs + 1):
        images += sum(epoch_fn(number))
    return images / (time.perf_counter() - started)


def measure(folder: Path, size: tuple[int, int], scale: float, workers: int, repeats: int, epochs: int,
            before_module) -> dict:
    rates: dict[str, list[float]] = {"before": [], "after": []}
    for repeat in range(repeats):
        order = ("before", "after") if repeat % 2 == 0 else ("after", "before")
        for which in order:
            if which == "before" and before_module is None:
                continue
            # a new loader each repeat: its start-up (and, before, every epoch's) is part of the cost
            epoch_fn = (loader_before(before_module, folder, scale, workers) if which == "before"
                        else loader_after(folder, scale, workers))
            rates[which].append(images_per_second(epoch_fn, epochs))
        print(f"  {size[0]}x{size[1]} scale {scale} workers {workers}: "
              + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items() if v), file=sys.stderr)
    result = {"size": list(size), "min_crop_scale": scale, "workers": workers, "epochs": epochs,
              "after": spread(rates["after"])}
    if rates["before"]:
        result["before"] = spread(rates["before"])
        result["speedup"] = spread([a / b for a, b in zip(rates["after"], rates["before"])])
    return result


def main(argv: list[str] | None = None) -> int:
    from service.inference import container_cpus
    from service.preprocessing import decode_image
    from training.augment import ImageAugment

    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--out", type=Path, required=True, help="results folder (docs/benchmarks/ for the docs)")
    args = parser.parse_args(argv)
    count, repeats, epochs = (16, 1, 1) if args.quick else (128, 4, 2)
    before = module_before()
    if before is None:
        print(f"no git history with {BEFORE}: measuring the current loader only", file=sys.stderr)
    cpus = container_cpus()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            folder = make_folder(Path(tmp) / f"{size[0]}x{size[1]}", size, count)
            # Keel's default crop scale with the default workers and in one process; torchvision's
            # 0.08, whose smallest crops leave less room for a reduced decode
            plan = [(0.5, cpus), (0.5, 0)] + ([] if args.quick else [(0.08, cpus)])
            for scale, workers in plan:
                runs.append(measure(folder, size, scale, workers, repeats, epochs, before))
                sample = next((folder / "train").rglob("*.jpg")).read_bytes()
                runs[-1]["decoded_size"] = list(decode_image(sample, draft_area=ImageAugment(CROP, (scale, 1.0))
                                                             .draft_area).size)
    results = {"name": NAME, "quick": args.quick, "before_commit": BEFORE if before else None, "crop": CROP,
               "batch_size": BATCH, "images_per_size": count, "runs": runs}
    path = write_results(args.out, NAME, results)
    print(render(results), file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def render(results: dict) -> str:
    lines = [
        "### Training data loading",
        "",
        f"Images/s through the training DataLoader: {results['crop']} px random-resized crops and flips of "
        f"{results['images_per_size']} generated photo JPEGs (quality 90) per size, batch {results['batch_size']}, "
        "median (min-max) over alternating repeats of a fresh loader run for "
        f"{results['runs'][0]['epochs']} epoch(s), start-up included. *Before*: training/data.py at "
        f"`{results['before_commit']}` (full decode, float32 from workers restarted every epoch); *after*: "
        "reduced-size JPEG decode bounded by the smallest crop, uint8 from persistent workers, normalised in "
        "the training process (counted here: on a GPU machine it runs on the GPU). Workers 0: one process, "
        "the per-image cost alone.",
        "",
        "| JPEG | min crop scale | decoded at (after) | workers | before | after | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        before = fmt(run["before"], 0) if "before" in run else "-"
        speedup = fmt(run["speedup"], 2) + "x" if "speedup" in run else "-"
        lines.append(f"| {run['size'][0]}x{run['size'][1]} | {run['min_crop_scale']} | "
                     f"{run['decoded_size'][0]}x{run['decoded_size'][1]} | {run['workers']} | {before} | "
                     f"{fmt(run['after'], 0)} | {speedup} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
