"""Shapes: the built-in, download-free image-classification data set.

Keel's pipeline (train -> ONNX export -> BentoML service) needs data that any checkout can make
offline in seconds and that a model still has to learn. Ten kinds of geometric shape are drawn
with a random colour, size (35-80% of the side), position, rotation and proportions, on a solid
or gradient background with thin distractor strokes and Gaussian pixel noise. Colour, position and
brightness say nothing about the class, so a linear model on raw pixels stays near chance
(tests/test_shapes.py) while a small CNN learns the outlines (>95% at 32 px).

Generate it as an ImageFolder tree (plus dataset.json):

    python -m training.shapes --out data/shapes
    python -m training.shapes --out data/shapes32 --size 32 --train-per-class 1000 --overwrite

Each image has its own generator seeded by (seed, split, class, index), so a data set is
pixel-identical across runs and does not depend on the order images are generated in.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from service.progress import Progress

# Alphabetical, so a class's index here is its index in an ImageFolder. No class is a rotation,
# mirror image or scaling of another (hence no "diamond": that is a rotated square).
CLASSES = ("arrow", "circle", "crescent", "cross", "hexagon", "pentagon", "ring", "square", "star", "triangle")
SPLITS = ("train", "val", "test")

SUPERSAMPLE = 4  # draw at 4x and box-downsample: antialiased edges from plain ImageDraw
SCALE_RANGE = (0.35, 0.80)  # diameter of the shape's enclosing circle, as a fraction of the side
MIN_CONTRAST = 110.0  # least RGB distance from the shape's colour to every background colour
MIN_STROKE_CONTRAST = 70.0  # so a stroke is never mistaken for part of the shape


@dataclass(frozen=True)
class ShapesConfig:
    size: int = 64  # image side in pixels
    train_per_class: int = 500  # a from-scratch CNN needs ~1000 steps of 64 to learn shapes
    val_per_class: int = 50
    test_per_class: int = 50
    seed: int = 0  # same seed, same pixels
    noise_std: float = 8.0  # Gaussian pixel noise: standard deviation in 0-255 levels

    def __post_init__(self):
        if self.size < 16:
            raise ValueError(f"size must be at least 16 pixels, not {self.size}")
        if min(self.train_per_class, self.val_per_class, self.test_per_class, self.seed, self.noise_std) < 0:
            raise ValueError("counts, seed and noise_std must not be negative")

    def per_class(self, split: str) -> int:
        return {"train": self.train_per_class, "val": self.val_per_class, "test": self.test_per_class}[split]

    @property
    def total(self) -> int:
        return len(CLASSES) * sum(self.per_class(split) for split in SPLITS)


def sample_rng(seed: int, split_index: int, class_index: int, sample_index: int) -> np.random.Generator:
    """One image's generator: keyed by position, so any image can be regenerated on its own."""
    return np.random.default_rng([seed, split_index, class_index, sample_index])


def _regular(corners: int, *radii: float, x: float = 0.0) -> np.ndarray:
    # A circle is a 96-gon; a star alternates its vertices between an outer and an inner radius.
    angles = np.arange(corners * len(radii)) * 2 * np.pi / (corners * len(radii))
    r = np.resize(np.asarray(radii), len(angles))
    return np.stack([x + r * np.cos(angles), r * np.sin(angles)], axis=1)


def _parts(name: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Polygons in unit coordinates, each filled (255) or cut out (0), in drawing order.

    Proportions vary per sample so that no class is one exact template.
    """
    polygons = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "circle": 96}
    if name in polygons:
        return [(_regular(polygons[name], 1.0), 255)]
    if name == "ring":
        return [(_regular(96, 1.0), 255), (_regular(96, rng.uniform(0.45, 0.65)), 0)]
    if name == "crescent":
        return [(_regular(96, 1.0), 255), (_regular(96, rng.uniform(0.75, 0.9), x=rng.uniform(0.4, 0.55)), 0)]
    if name == "star":
        return [(_regular(5, 1.0, rng.uniform(0.36, 0.5)), 255)]
    if name == "cross":
        w = rng.uniform(0.2, 0.33)  # half the arm width; arms reach 1
        quarter = np.array([[w, 1.0], [w, w], [1.0, w]])
        turn = np.array([[0.0, 1.0], [-1.0, 0.0]])  # (x, y) -> (y, -x)
        return [(np.concatenate([quarter @ np.linalg.matrix_power(turn, k).T for k in range(4)]), 255)]
    if name == "arrow":
        shaft, head, base = rng.uniform(0.12, 0.2), rng.uniform(0.42, 0.55), rng.uniform(0.1, 0.4)
        outline = [(1, 0), (base, -head), (base, -shaft), (-1, -shaft), (-1, shaft), (base, shaft), (base, head)]
        return [(np.array(outline, dtype=float), 255)]
    raise ValueError(f"unknown shape {name!r}; expected one of {CLASSES}")


def _contrasting_colour(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, minimum: float) -> np.ndarray:
    """A random colour at least `minimum` away from every colour on the segment a-b (a gradient).

    Rejection keeps it uniform over what is allowed; every segment in the RGB cube leaves plenty
    of colours far enough away, so this takes a few draws at most.
    """
    ab = b - a
    while True:
        colour = rng.uniform(0.0, 255.0, 3)
        t = float(np.clip((colour - a) @ ab / (ab @ ab), 0.0, 1.0)) if ab.any() else 0.0
        if np.linalg.norm(colour - (a + t * ab)) >= minimum:
            return colour


def _coverage(mask: Image.Image, size: int) -> np.ndarray:
    """4x mask -> per-pixel coverage in [0, 1] (a box filter is the exact area average)."""
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255.0


def _stroke(rng: np.random.Generator, canvas: int) -> Image.Image:
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    width = max(1, round(rng.uniform(0.015, 0.03) * canvas))  # 1-2 pixels at 64 px: thin at any size
    if rng.random() < 0.5:
        x0, y0, x1, y1 = rng.uniform(-0.1 * canvas, 1.1 * canvas, 4)
        draw.line([(x0, y0), (x1, y1)], fill=255, width=width)
    else:
        (cx, cy), r, start = rng.uniform(0, canvas, 2), rng.uniform(0.3, 0.8) * canvas, rng.uniform(0, 360)
        draw.arc([cx - r, cy - r, cx + r, cy + r], start, start + rng.uniform(60, 180), fill=255, width=width)
    return mask


def render_sample(class_name: str, rng: np.random.Generator, size: int,
                  noise_std: float = ShapesConfig.noise_std) -> Image.Image:
    """One size x size RGB image of `class_name`; every random choice comes from `rng`."""
    canvas = size * SUPERSAMPLE
    low = rng.uniform(0.0, 255.0, 3)  # background: solid, or a linear gradient in a random direction
    high = low if rng.random() < 0.5 else rng.uniform(0.0, 255.0, 3)
    angle = rng.uniform(0.0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
    t = (xs * math.cos(angle) + ys * math.sin(angle)) / (abs(math.cos(angle)) + abs(math.sin(angle))) + 0.5
    image = low + t[..., None] * (high - low)
    foreground = _contrasting_colour(rng, low, high, MIN_CONTRAST)

    # Scale by the enclosing circle, which bounds the shape at every rotation: keeping that circle
    # inside the image keeps the whole shape inside.
    parts = _parts(class_name, rng)
    filled = np.concatenate([points for points, value in parts if value])
    centre = (filled.min(axis=0) + filled.max(axis=0)) / 2
    reach = np.linalg.norm(filled - centre, axis=1).max()
    theta = rng.uniform(0.0, 2 * np.pi)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    radius = rng.uniform(*SCALE_RANGE) * canvas / 2
    position = rng.uniform(radius + SUPERSAMPLE, canvas - radius - SUPERSAMPLE, 2)
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    for points, value in parts:
        draw.polygon([tuple(p) for p in (points - centre) @ rotation.T * (radius / reach) + position], fill=value)

    strokes = []  # one or two: (drawn over the shape?, coverage, colour)
    for _ in range(int(rng.integers(1, 3))):
        colour = _contrasting_colour(rng, foreground, foreground, MIN_STROKE_CONTRAST)
        strokes.append((rng.random() < 0.5, _coverage(_stroke(rng, canvas), size), colour))
    under = [(alpha, colour) for over, alpha, colour in strokes if not over]
    above = [(alpha, colour) for over, alpha, colour in strokes if over]
    for alpha, colour in under + [(_coverage(mask, size), foreground)] + above:
        image = image * (1 - alpha) + colour * alpha
    image = image + rng.normal(0.0, noise_std, image.shape)
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), mode="RGB")


def _write_tree(root: Path, config: ShapesConfig, progress: bool) -> None:
    bar = Progress(config.total, "shapes") if progress else None
    for split_index, split in enumerate(SPLITS):
        for class_index, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(config.per_class(split)):
                rng = sample_rng(config.seed, split_index, class_index, i)
                render_sample(name, rng, config.size, config.noise_std).save(folder / f"{i:05d}.png")
                if bar:
                    bar.update()
    if bar:
        bar.close()
    splits = {split: config.per_class(split) * len(CLASSES) for split in SPLITS}
    metadata = {"name": "shapes", "classes": list(CLASSES), "splits": splits, "config": asdict(config)}
    (root / "dataset.json").write_text(json.dumps(metadata, indent=2) + "\n")


def generate_dataset(out_dir, config: ShapesConfig = ShapesConfig(), progress: bool = True,
                     overwrite: bool = False) -> Path:
    """Write out_dir/{train,val,test}/<class>/<NNNNN>.png and out_dir/dataset.json; return out_dir.

    A non-empty out_dir is an error unless overwrite=True, which replaces it as a whole.
    """
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; pass overwrite=True (--overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Built beside out_dir (same file system, so the rename is atomic) and moved into place only
    # when complete: an interrupted run never leaves a partial data set under the real name.
    # (not tempfile.mkdtemp: its 0700 mode would stay on the finished data set)
    staging = out_dir.with_name(f".{out_dir.name}.{secrets.token_hex(4)}.tmp")
    staging.mkdir()
    try:
        _write_tree(staging, config, progress)
        if out_dir.exists():  # os.replace cannot replace a non-empty directory: move it aside
            old = staging.with_name(staging.name + ".old")
            os.replace(out_dir, old)
            os.replace(staging, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.shapes", description="Generate the shapes data set.")
    parser.add_argument("--out", required=True, type=Path, help="directory to create (an ImageFolder tree)")
    for field in fields(ShapesConfig):  # --size, --train-per-class, ..., --noise-std: one per config field
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default,
                            help=f"default: {field.default}")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = vars(parser.parse_args(argv))
    start = time.perf_counter()
    try:
        config = ShapesConfig(**{field.name: args[field.name] for field in fields(ShapesConfig)})
        out = generate_dataset(args["out"], config, progress=True, overwrite=args["overwrite"])
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    print(f"wrote {config.total} images ({len(CLASSES)} classes, {config.size}x{config.size} px) to {out} "
          f"in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
