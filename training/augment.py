"""Training augmentation, in Pillow and torch only (torchvision does not import beside the pinned torch).

Per image, in the data-loading workers, on the decoded RGB image (`ImageAugment`):
  random-resized crop (area share `scale`, aspect 3/4..4/3) -> horizontal flip -> colour jitter
  -> TrivialAugmentWide or RandAugment.
Per batch, in the training process on the device, after normalisation (`BatchAugment`):
  random erasing -> mixup or cutmix (soft targets).

Each follows torchvision's definition (transforms/autoaugment.py, v2/_auto_augment.py, v2/_augment.py,
transforms.py): the same op set, magnitude bins, signs, interpolation (nearest) and black fill, the
same parameter draws. Deviations, each for a reason:
  - Randomness comes from a `random.Random` handed in, never from a global generator: a sample's
    augmentation is a function of its seed alone (training/data.py draws one per sample and epoch),
    which is what lets the loader's workers persist and a resumed run repeat an uninterrupted one.
  - Solarize at threshold 255 (its weakest bin, magnitude 0) is the identity here; torchvision still
    inverts pure-white pixels there. So every op is the identity at magnitude 0, as in timm.
  - Random erasing runs on the normalised batch on the device (as timm does), not per sample in the
    workers, because the workers hand over uint8 images; value 0 is the mean colour, as there.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

AUTO_AUGMENT = ("", "ta_wide", "ra")  # torchvision's reference-script names; "" is none
CROP_RATIO = (3 / 4, 4 / 3)  # random-resized crop's aspect range (torchvision's default)
MAGNITUDE_BINS = 31  # torchvision's num_magnitude_bins for TrivialAugmentWide and RandAugment
FILL = (0, 0, 0)  # what geometric ops move into the frame (torchvision: fill=None, i.e. 0)


@dataclass(frozen=True)
class ImageAugment:
    """The per-image training transform: decoded RGB image -> crop x crop RGB image."""

    crop: int
    scale: tuple[float, float] = (0.08, 1.0)  # share of the image's area a crop covers
    color_jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
    auto_augment: str = ""  # "", "ta_wide" (TrivialAugmentWide) or "ra" (RandAugment)
    ra_num_ops: int = 2
    ra_magnitude: int = 9  # bin, 0..MAGNITUDE_BINS - 1

    def __post_init__(self):
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"crop scales must satisfy 0 < min_crop_scale <= max_crop_scale <= 1, not {self.scale}")
        if self.auto_augment not in AUTO_AUGMENT:
            raise ValueError(f"auto_augment must be one of {AUTO_AUGMENT}, not {self.auto_augment!r}")
        if self.ra_num_ops < 0:
            raise ValueError(f"ra_num_ops must not be negative, not {self.ra_num_ops}")
        if not 0 <= self.ra_magnitude < MAGNITUDE_BINS:
            raise ValueError(f"ra_magnitude must be a bin from 0 to {MAGNITUDE_BINS - 1}, not {self.ra_magnitude}")
        if min(self.color_jitter) < 0 or self.color_jitter[3] > 0.5:
            raise ValueError(f"color_jitter values must be non-negative, hue at most 0.5, not {self.color_jitter}")

    @property
    def draft_area(self) -> int:
        """The fewest pixels a reduced JPEG decode may keep so that the smallest crop this transform can
        cut (area share scale[0], the most extreme aspect) still has >= crop pixels on each side: a crop
        of area A and aspect r has sides sqrt(A r) and sqrt(A / r), the shorter >= sqrt(A * 3/4)."""
        return math.ceil(self.crop**2 / (self.scale[0] * min(CROP_RATIO[0], 1 / CROP_RATIO[1])))

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        image = random_resized_crop(image, self.crop, self.scale, rng)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if any(self.color_jitter):
            image = color_jitter(image, *self.color_jitter, rng)
        if self.auto_augment == "ta_wide":
            image = trivial_augment_wide(image, rng)
        elif self.auto_augment == "ra":
            image = rand_augment(image, rng, self.ra_num_ops, self.ra_magnitude)
        return image


def random_resized_crop(image: Image.Image, size: int, scale: tuple[float, float], rng: random.Random,
                        ratio: tuple[float, float] = CROP_RATIO) -> Image.Image:
    """torchvision's RandomResizedCrop: the box `crop_box` draws, resized to size x size (bilinear)."""
    left, top, w, h = crop_box(*image.size, scale, rng, ratio)
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))


def crop_box(width: int, height: int, scale: tuple[float, float], rng: random.Random,
             ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """(left, top, width, height): 10 tries at a random area share and log-uniform aspect, else the
    whole image cut to the aspect range (torchvision's RandomResizedCrop.get_params)."""
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    w, h = width, height
    if width / height < ratio[0]:
        h = round(w / ratio[0])
    elif width / height > ratio[1]:
        w = round(h * ratio[1])
    return (width - w) // 2, (height - h) // 2, w, h


def color_jitter(image: Image.Image, brightness: float, contrast: float, saturation: float, hue: float,
                 rng: random.Random) -> Image.Image:
    """torchvision's ColorJitter: factors from [1 - x, 1 + x] (hue: a shift in [-hue, hue] of the
    colour circle), applied in a random order; a zero leaves that property alone."""
    order = [0, 1, 2, 3]
    rng.shuffle(order)
    factors = [rng.uniform(max(0.0, 1 - x), 1 + x) if x else None for x in (brightness, contrast, saturation)]
    shift = rng.uniform(-hue, hue) if hue else None
    for which in order:
        if which == 0 and factors[0] is not None:
            image = ImageEnhance.Brightness(image).enhance(factors[0])
        elif which == 1 and factors[1] is not None:
            image = ImageEnhance.Contrast(image).enhance(factors[1])
        elif which == 2 and factors[2] is not None:
            image = ImageEnhance.Color(image).enhance(factors[2])
        elif which == 3 and shift is not None:
            image = adjust_hue(image, shift)
    return image


def adjust_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by `shift` turns (torchvision's PIL adjust_hue: the H channel wraps around)."""
    h, s, v = image.convert("HSV").split()
    hues = (np.asarray(h, dtype=np.int16) + int(shift * 255)) % 256
    return Image.merge("HSV", (Image.fromarray(hues.astype(np.uint8), "L"), s, v)).convert("RGB")


def _linspace(start: float, stop: float, bins: int) -> list[float]:
    return [start + (stop - start) * i / (bins - 1) for i in range(bins)]


def augmentation_space(policy: str, bins: int, width: int, height: int) -> dict[str, tuple[list | None, bool]]:
    """op -> (magnitude of each bin, or None for ops without one; whether the sign is random), as in
    torchvision's RandAugment ("ra") and TrivialAugmentWide ("ta_wide") _AUGMENTATION_SPACE."""
    wide = policy == "ta_wide"
    top = 0.99 if wide else 0.9
    return {
        "Identity": (None, False),
        "ShearX": (_linspace(0.0, 0.99 if wide else 0.3, bins), True),
        "ShearY": (_linspace(0.0, 0.99 if wide else 0.3, bins), True),
        "TranslateX": (_linspace(0.0, 32.0 if wide else 150.0 / 331.0 * width, bins), True),
        "TranslateY": (_linspace(0.0, 32.0 if wide else 150.0 / 331.0 * height, bins), True),
        "Rotate": (_linspace(0.0, 135.0 if wide else 30.0, bins), True),
        "Brightness": (_linspace(0.0, top, bins), True),
        "Color": (_linspace(0.0, top, bins), True),
        "Contrast": (_linspace(0.0, top, bins), True),
        "Sharpness": (_linspace(0.0, top, bins), True),
        "Posterize": ([8 - round(i / ((bins - 1) / (6 if wide else 4))) for i in range(bins)], False),
        "Solarize": (_linspace(1.0, 0.0, bins), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
    }


def apply_op(image: Image.Image, op: str, magnitude: float) -> Image.Image:
    """One op of the augmentation space at `magnitude` (torchvision's _apply_image_or_video_transform
    on a PIL image). Shears are about the top-left corner, translations whole pixels, nearest neighbour."""
    nearest = Image.Resampling.NEAREST
    if op == "Identity":
        return image
    if op in ("ShearX", "ShearY", "TranslateX", "TranslateY"):
        # torchvision's F.affine, reduced to the inverse map Pillow takes: (x, y) of the output reads
        # the input at (a x + b y + c, d x + e y + f)
        matrix = {"ShearX": (1, magnitude, 0, 0, 1, 0), "ShearY": (1, 0, 0, magnitude, 1, 0),
                  "TranslateX": (1, 0, -int(magnitude), 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, -int(magnitude))}[op]
        if matrix == (1, 0, 0, 0, 1, 0):
            return image
        return image.transform(image.size, Image.Transform.AFFINE, matrix, nearest, fillcolor=FILL)
    if op == "Rotate":
        return image.rotate(magnitude, nearest, fillcolor=FILL)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return getattr(ImageEnhance, op)(image).enhance(1.0 + magnitude)
    if op == "Posterize":
        return ImageOps.posterize(image, int(magnitude))
    if op == "Solarize":
        threshold = 255.0 * magnitude
        return image if threshold >= 255 else ImageOps.solarize(image, threshold)
    if op == "AutoContrast":
        return ImageOps.autocontrast(image)
    if op == "Equalize":
        return ImageOps.equalize(image)
    raise ValueError(f"unknown augmentation op {op!r}")


def _signed(magnitude: float, signed: bool, rng: random.Random) -> float:
    return -magnitude if signed and rng.random() <= 0.5 else magnitude


def trivial_augment_wide(image: Image.Image, rng: random.Random, bins: int = MAGNITUDE_BINS) -> Image.Image:
    """TrivialAugmentWide (Müller & Hutter 2021): one op, uniformly, at a uniformly drawn magnitude bin."""
    space = augmentation_space("ta_wide", bins, *image.size)
    op = rng.choice(list(space))
    magnitudes, signed = space[op]
    magnitude = _signed(magnitudes[rng.randrange(bins)], signed, rng) if magnitudes else 0.0
    return apply_op(image, op, magnitude)


def rand_augment(image: Image.Image, rng: random.Random, num_ops: int = 2, magnitude: int = 9,
                 bins: int = MAGNITUDE_BINS) -> Image.Image:
    """RandAugment (Cubuk et al. 2019): `num_ops` ops drawn uniformly, each at magnitude bin `magnitude`."""
    space = augmentation_space("ra", bins, *image.size)
    for _ in range(num_ops):
        op = rng.choice(list(space))
        magnitudes, signed = space[op]
        image = apply_op(image, op, _signed(magnitudes[magnitude], signed, rng) if magnitudes else 0.0)
    return image


@dataclass(frozen=True)
class BatchAugment:
    """Random erasing, then mixup or cutmix, on a normalised batch on the device.

    Returns the batch and its targets: class indices when nothing mixes, else N x classes
    probabilities (each row sums to 1), which nn.CrossEntropyLoss takes as they are, label smoothing
    included. The draws come from (seed, step) alone, so a resumed run repeats them.
    """

    num_classes: int
    random_erase: float = 0.0  # probability per image (torchvision's --random-erase)
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) mixing weight; 0: off
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) area kept; 0: off. With both on, each batch picks one
    seed: str = "0"

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not (self.random_erase or self.mixup_alpha or self.cutmix_alpha):
            return images, targets
        rng = random.Random(f"batch {self.seed} {step}")
        if self.random_erase:
            images = random_erasing(images, self.random_erase, rng)
        if self.mixup_alpha or self.cutmix_alpha:
            images, targets = mix(images, targets, self.num_classes, self.mixup_alpha, self.cutmix_alpha, rng)
        return images, targets


def random_erasing(images: torch.Tensor, p: float, rng: random.Random, scale: tuple[float, float] = (0.02, 0.33),
                   ratio: tuple[float, float] = (0.3, 3.3), value: float = 0.0) -> torch.Tensor:
    """torchvision's RandomErasing on each image of an N x C x H x W batch: with probability p, a box
    of random area share and log-uniform aspect (10 tries to fit) set to `value`."""
    erased = images.clone()  # the caller's batch stays as it was
    _, _, height, width = images.shape
    for index in range(len(images)):
        if not rng.random() < p:
            continue
        for _ in range(10):
            area = height * width * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h < height and w < width:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                erased[index, :, top:top + h, left:left + w] = value
                break
    return erased


def mix(images: torch.Tensor, targets: torch.Tensor, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
        rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's MixUp or CutMix (one of them, uniformly, when both are on) with each image's
    partner the previous one in the batch (roll by 1): a Beta(alpha, alpha) weight lam; mixup blends
    lam x image + (1 - lam) x partner, cutmix pastes the partner into a box covering about 1 - lam of
    the image (lam is then the exact share left). Targets: the one-hot labels mixed the same way."""
    use_mixup = cutmix_alpha <= 0 or (mixup_alpha > 0 and rng.random() < 0.5)
    lam = rng.betavariate(mixup_alpha, mixup_alpha) if use_mixup else rng.betavariate(cutmix_alpha, cutmix_alpha)
    partner = images.roll(1, 0)
    if use_mixup:
        images = partner.mul(1.0 - lam).add_(images.mul(lam))
    else:
        height, width = images.shape[-2:]
        x, y = rng.randrange(width), rng.randrange(height)
        half = 0.5 * math.sqrt(1.0 - lam)
        half_w, half_h = int(half * width), int(half * height)
        x1, y1, x2, y2 = max(x - half_w, 0), max(y - half_h, 0), min(x + half_w, width), min(y + half_h, height)
        images = images.clone()
        images[..., y1:y2, x1:x2] = partner[..., y1:y2, x1:x2]
        lam = 1.0 - (x2 - x1) * (y2 - y1) / (width * height)
    one_hot = torch.nn.functional.one_hot(targets, num_classes).to(images.dtype)
    return images, one_hot.roll(1, 0).mul_(1.0 - lam).add_(one_hot.mul(lam))
