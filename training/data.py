"""ImageFolder data sets: `ROOT/<split>/<class>/<image>`, the layout torchvision and most tools use.

Evaluation images go through `service.preprocessing` (the exact transform the service applies);
training images get a random-resized crop and a horizontal flip, then the same normalization.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.preprocessing import PreprocessSpec, decode_image, find_images, normalize, preprocess


def find_classes(split_dir: Path) -> list[str]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>)")
    return classes


class ImageFolder(torch.utils.data.Dataset):
    """(image tensor 3 x S x S, class index) pairs from one split folder."""

    def __init__(self, split_dir: str | Path, classes: list[str], spec: PreprocessSpec, train: bool,
                 min_crop_scale: float = 0.5):
        self.root = Path(split_dir)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such split folder")
        self.classes = classes
        self.spec = spec
        self.train = train
        self.min_crop_scale = min_crop_scale
        self.samples: list[tuple[Path, int]] = []
        for index, name in enumerate(classes):
            folder = self.root / name
            if folder.is_dir():
                self.samples += [(path, index) for path in find_images(folder)]
        if not self.samples:
            raise FileNotFoundError(f"{self.root}: no images found in the class folders")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        image = decode_image(path.read_bytes())
        array = self.augment(image) if self.train else preprocess(image, self.spec)
        return torch.from_numpy(array), target

    def augment(self, image: Image.Image) -> np.ndarray:
        """Random-resized crop (area >= min_crop_scale, aspect 3/4..4/3) and horizontal flip."""
        rng = random.Random(torch.randint(0, 2**31, ()).item())  # follows torch's per-worker seeding
        width, height = image.size
        for _ in range(10):
            area = width * height * rng.uniform(self.min_crop_scale, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                break
        else:  # fall back to the centre square
            w = h = min(width, height)
            left, top = (width - w) // 2, (height - h) // 2
        size = self.spec.crop
        image = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return normalize(image, self.spec)
