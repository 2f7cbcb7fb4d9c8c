"""`python -m training.check_data DIR [--json]`: what is wrong with an ImageFolder tree, before anyone trains on it.

Reads every image under DIR/{train,val,test}/<class>/ the way training does (service.preprocessing:
the same file suffixes, the same decoder, the same pixel limit) and reports:

- class counts per split, and imbalance (largest class over smallest);
- files training cannot read (corrupt, truncated, not an image), and files it never looks at (an
  unknown suffix, e.g. .heic);
- odd modes (CMYK, palette, 16/32-bit, alpha), which the pipeline converts but which are worth knowing;
- odd sizes: tiny, over the pixel limit, extreme aspect ratios;
- exact duplicates (SHA-256 of the bytes): within a class, across classes (conflicting labels) and
  across splits (leakage: evaluation on training images);
- classes missing from a split, or present in val/test but not in train.

Exit status: 0 nothing found, 1 problems found (each kind can be accepted with --ignore KIND), 2 the
tree is unusable (no such folder, no train/ split, no class folders, no images).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import statistics
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from service.preprocessing import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, find_images
from service.progress import Progress

SPLITS = ("train", "val", "test")
# Every kind of problem, in report order, with what it means for training and serving.
KINDS = {
    "missing_split": "training needs train/ and val/",
    "unreadable": "corrupt, truncated or not an image: training skips them (RUN/skipped.jsonl), the service says 400",
    "ignored_files": "not an image suffix training reads (service.preprocessing.IMAGE_SUFFIXES): never used",
    "huge": "over the pixel limit: training skips them and the service refuses them (KEEL_MAX_PIXELS)",
    "tiny": "shorter side under --min-side: upscaled, so blurred",
    "extreme_aspect": "longer side over --max-aspect times the shorter: a centre crop sees a small part",
    "cmyk": "CMYK, converted to RGB without its colour profile: colours may shift",
    "palette": "palette (indexed) colours, as in GIFs and screenshots; converted to RGB",
    "high_bit_depth": "16- or 32-bit, scaled to 8 bits by each image's own range",
    "alpha": "transparency, composited onto white",
    "duplicate": "the same file more than once in one class and split: it counts twice",
    "conflicting_labels": "the same file under different classes of one split",
    "leakage": "the same file in more than one split: evaluation sees training images",
    "missing_class": "a class with no images in a split, or a val/test class that train/ lacks (training ignores it)",
    "imbalance": "the largest class has over --max-imbalance times the images of the smallest",
}


def inspect(job: tuple[str, int, bool]) -> dict:
    """One file: size, hash, format, mode and, unless headers_only, whether it decodes as training decodes it."""
    path, max_pixels, headers_only = job
    record: dict = {"path": path}
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return {**record, "error": f"cannot be read: {exc.strerror or exc}"}
    record.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
    except Exception as exc:
        return {**record, "error": f"not a recognised image format ({type(exc).__name__})"}
    alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    record.update(format=image.format, mode=image.mode, width=image.width, height=image.height, alpha=alpha)
    if headers_only or image.width * image.height > max_pixels:
        return record
    try:  # the whole stream, as training reads it; a reduced-size JPEG decode still reads every byte
        decode_image(data, max_pixels, draft_area=64 * 64)
    except ImageDecodeError as exc:
        record["error"] = str(exc)
    return record


def scan(root: Path, *, workers: int, max_pixels: int, headers_only: bool, progress: bool = True) -> dict:
    """Inspect every file of the tree; raises FileNotFoundError when it is not a usable ImageFolder tree."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"{root}: no train/ split (expected {root}/train/<class>/<image>)")
    splits = {split: sorted(p.name for p in (root / split).iterdir() if p.is_dir() and not p.name.startswith("."))
              for split in SPLITS if (root / split).is_dir()}
    if not splits["train"]:
        raise FileNotFoundError(f"{root}/train: no class folders (expected {root}/train/<class>/<image>)")
    files, ignored = [], []
    for split, classes in splits.items():
        for name in classes:
            images = find_images(root / split / name)
            files += [(split, name, path) for path in images]
            chosen = set(images)
            ignored += [path for path in sorted((root / split / name).rglob("*"))
                        if path.is_file() and path not in chosen and not path.name.startswith(".")]
    if not files:
        raise FileNotFoundError(f"{root}: no images in any class folder")
    bar = Progress(len(files), "checking", log_lines=0) if progress else None
    records = []
    with ProcessPoolExecutor(workers) as pool:
        for (split, name, _), record in zip(files, pool.map(inspect, [(str(p), max_pixels, headers_only)
                                                                       for _, _, p in files], chunksize=16)):
            relative = str(Path(record["path"]).relative_to(root))
            records.append({**record, "split": split, "class": name, "path": relative})
            if bar:
                bar.update()
    if bar:
        bar.clear()
    return {"splits": splits, "records": records, "ignored": [str(p.relative_to(root)) for p in ignored]}


def findings(scanned: dict, *, min_side: int, max_aspect: float, max_imbalance: float, max_pixels: int) -> dict:
    """The report: counts per split and class, and every problem of every kind (KINDS)."""
    splits, records = scanned["splits"], scanned["records"]
    problems: dict[str, list] = collections.defaultdict(list)
    for split in ("train", "val"):
        if split not in splits:
            problems["missing_split"].append({"split": split, "detail": f"no {split}/ folder"})
    problems["ignored_files"] = [{"path": path} for path in scanned["ignored"]]
    for r in records:
        if "error" in r:
            problems["unreadable"].append({"path": r["path"], "detail": r["error"]})
        if "width" not in r:
            continue
        short, long = sorted((r["width"], r["height"]))
        size = f"{r['width']}x{r['height']}"
        if r["width"] * r["height"] > max_pixels:
            problems["huge"].append({"path": r["path"], "detail": f"{size} = {r['width'] * r['height']} pixels"})
        if short < min_side:
            problems["tiny"].append({"path": r["path"], "detail": size})
        if long > max_aspect * max(short, 1):
            problems["extreme_aspect"].append({"path": r["path"], "detail": f"{size} ({long / max(short, 1):.1f}:1)"})
        mode = r["mode"]
        kind = ("cmyk" if mode == "CMYK" else "palette" if mode in ("P", "PA")
                else "high_bit_depth" if mode.startswith("I") or mode == "F" else None)
        if kind:
            problems[kind].append({"path": r["path"], "detail": f"{r['format']} {mode}"})
        if r["alpha"]:
            problems["alpha"].append({"path": r["path"], "detail": f"{r['format']} {mode}"})

    same = collections.defaultdict(list)
    for r in records:
        if "sha256" in r:
            same[r["sha256"]].append(r)
    for group in same.values():
        if len(group) < 2:
            continue
        paths = [r["path"] for r in group]
        if len({r["split"] for r in group}) > 1:
            problems["leakage"].append({"paths": paths, "detail": " = ".join(paths)})
        elif len({r["class"] for r in group}) > 1:
            problems["conflicting_labels"].append({"paths": paths, "detail": " = ".join(paths)})
        else:
            problems["duplicate"].append({"paths": paths, "detail": " = ".join(paths)})

    counts = {split: {name: 0 for name in classes} for split, classes in splits.items()}
    for r in records:
        counts[r["split"]][r["class"]] += 1
    train_classes = set(splits["train"])
    summary = {}
    for split, per_class in counts.items():
        missing = [(name, "no images") for name, count in per_class.items() if count == 0]
        missing += [(name, "not a class in train/") for name in per_class if name not in train_classes]
        missing += [(name, "no folder") for name in sorted(train_classes - set(per_class))]
        problems["missing_class"] += [{"split": split, "class": name, "detail": f"{split}/{name}: {why}"}
                                      for name, why in missing]
        present = {name: count for name, count in per_class.items() if count}
        imbalance = max(present.values()) / min(present.values()) if present else None
        if imbalance and imbalance > max_imbalance:
            largest, smallest = max(present, key=present.get), min(present, key=present.get)
            problems["imbalance"].append({"split": split, "detail": f"{split}: {imbalance:.1f}x ({largest} "
                                          f"{present[largest]}, {smallest} {present[smallest]})"})
        summary[split] = {"images": sum(per_class.values()), "classes": per_class,
                          "imbalance": round(imbalance, 2) if imbalance else None}
    sides = [min(r["width"], r["height"]) for r in records if "width" in r]
    return {
        "images": len(records), "bytes": sum(r.get("bytes", 0) for r in records), "splits": summary,
        "formats": dict(collections.Counter(r.get("format", "unreadable") for r in records).most_common()),
        "modes": dict(collections.Counter(r.get("mode", "unreadable") for r in records).most_common()),
        "shorter_side": ({"min": min(sides), "median": statistics.median(sides), "max": max(sides)} if sides else None),
        "problems": {kind: problems[kind] for kind in KINDS if problems.get(kind)},
    }


def render(root: Path, report: dict, listed: int = 10) -> str:
    lines = [f"{root}: {report['images']} images, {report['bytes'] / 2**20:.1f} MiB; formats "
             + ", ".join(f"{k} {v}" for k, v in report["formats"].items()) + "; modes "
             + ", ".join(f"{k} {v}" for k, v in report["modes"].items())]
    if report["shorter_side"]:
        side = report["shorter_side"]
        lines.append(f"shorter side: min {side['min']}, median {side['median']:g}, max {side['max']} px")
    splits = report["splits"]
    classes = sorted({name for split in splits.values() for name in split["classes"]})
    width = max(len(name) for name in classes + ["imbalance"])
    lines += ["", f"{'class':<{width}}  " + "  ".join(f"{split:>7}" for split in splits)]
    lines += [f"{name:<{width}}  " + "  ".join(f"{splits[split]['classes'].get(name, 0):>7}" for split in splits)
              for name in classes]
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{splits[split]['images']:>7}" for split in splits))
    lines.append(f"{'imbalance':<{width}}  " + "  ".join(
        f"{splits[split]['imbalance']:>6.1f}x" if splits[split]["imbalance"] else f"{'-':>7}" for split in splits))
    problems = report["problems"]
    if not problems:
        lines += ["", "no problems found"]
    for kind, items in problems.items():
        lines += ["", f"{kind} ({len(items)}): {KINDS[kind]}"]
        for item in items[:listed]:
            lines.append("  " + (item["detail"] if "path" not in item else f"{item['path']}: {item['detail']}"
                                 if "detail" in item else item["path"]))
        if len(items) > listed:
            lines.append(f"  ... and {len(items) - listed} more (--json lists them all)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.check_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", metavar="DIR", type=Path, help="an ImageFolder tree: DIR/{train,val,test}/<class>/")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    parser.add_argument("--min-side", type=int, default=32, help="shorter sides below this are 'tiny' (default: 32)")
    parser.add_argument("--max-aspect", type=float, default=4.0,
                        help="longer side over this times the shorter is 'extreme_aspect' (default: 4)")
    parser.add_argument("--max-imbalance", type=float, default=10.0,
                        help="largest class over this times the smallest is 'imbalance' (default: 10)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"the pixel limit of training and the service (default: {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--ignore", nargs="+", default=[], choices=list(KINDS), metavar="KIND",
                        help="kinds still reported but not counted as problems (exit 0): " + ", ".join(KINDS))
    parser.add_argument("--headers-only", action="store_true",
                        help="read headers and hashes only: much faster, but truncated files go unnoticed")
    parser.add_argument("--workers", type=int, default=0, help="processes (default: the CPUs this process may use)")
    args = parser.parse_args(argv)
    if args.workers <= 0:
        from service.inference import container_cpus

        args.workers = container_cpus()
    try:
        scanned = scan(args.root, workers=args.workers, max_pixels=args.max_pixels, headers_only=args.headers_only,
                       progress=not args.json)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = findings(scanned, min_side=args.min_side, max_aspect=args.max_aspect, max_imbalance=args.max_imbalance,
                      max_pixels=args.max_pixels)
    counted = {kind: len(items) for kind, items in report["problems"].items() if kind not in args.ignore}
    report.update(root=str(args.root), problem_count=sum(counted.values()), ignored_kinds=args.ignore)
    print(json.dumps(report, indent=2) if args.json else render(args.root, report))
    if counted and not args.json:
        print(f"\n{sum(counted.values())} problems: " + ", ".join(f"{k} {v}" for k, v in counted.items()),
              file=sys.stderr)
    return 1 if counted else 0


if __name__ == "__main__":
    sys.exit(main())
