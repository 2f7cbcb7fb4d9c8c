"""The one image pipeline: bytes -> RGB image -> normalized NCHW float32 tensor.

Training's evaluation transform, the export metadata, the service and the batch job all use this
module, so a model sees exactly the pixels it was evaluated on. It needs only Pillow and numpy:
the serving side never imports torch.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Pillow's own decompression-bomb guard is replaced by our explicit `max_pixels` check.
Image.MAX_IMAGE_PIXELS = None

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}  # what folder scans pick up
DEFAULT_MAX_PIXELS = 40_000_000  # ~ 7300 x 5500; a 4-channel decode of that is 160 MB


def find_images(root: str | Path) -> list[Path]:
    """Every image file under `root`, recursively, in sorted order (none when `root` is missing)."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class ImageDecodeError(ValueError):
    """The bytes are not an image we can classify; the message says why, for the client."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How a model wants its input. Saved in checkpoints and in ONNX metadata."""

    resize: int = 256  # shorter side is resized to this many pixels (aspect ratio kept)
    crop: int = 224  # then the centre crop x crop square is the model input
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # per RGB channel, on [0, 1] pixels
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"  # Pillow filter used for the resize
    channel_order: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "float32"

    def __post_init__(self):
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        if self.interpolation not in _FILTERS:
            raise ValueError(f"interpolation must be one of {sorted(_FILTERS)}, not {self.interpolation!r}")
        if (self.channel_order, self.layout, self.dtype) != ("RGB", "NCHW", "float32"):
            raise ValueError("only RGB / NCHW / float32 inputs are implemented")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        return cls.from_dict(json.loads(text))


_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


DRAFT_FACTOR = 2  # reduced JPEG decode keeps the shorter side at least this many times the resize target


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_to: int | None = None, *,
                 draft_area: int | None = None) -> Image.Image:
    """Decode any image Pillow reads into an upright RGB image, or raise ImageDecodeError.

    EXIF orientation is applied, only the first frame of an animation is used, transparency is
    composited onto white, and the pixel count is checked from the header before decoding.
    `draft_to` (the resize target) lets a large JPEG decode at 1/2, 1/4 or 1/8 scale in the DCT
    itself, keeping its shorter side >= DRAFT_FACTOR x draft_to: several times faster, and within
    the tolerance tests/test_preprocessing.py states of a full decode (None: full decode, as
    training's evaluation transform does). `draft_area` instead keeps at least that many pixels:
    training's random crops, whose smallest must still be cut at full resolution (training/augment.py).
    """
    if not data:
        raise ImageDecodeError("empty upload: no image bytes received")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # Pillow raises several types for "not an image"
        raise ImageDecodeError(f"not a recognised image format ({type(exc).__name__})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Truncated File Read" / corrupt EXIF warnings
            scale = None  # the least the image may shrink to, per side; draft() halves at least
            if draft_to and image.format == "JPEG" and min(width, height) >= 2 * DRAFT_FACTOR * draft_to:
                scale = DRAFT_FACTOR * draft_to / min(width, height)
            elif draft_area and image.format == "JPEG" and width * height >= 4 * draft_area:
                scale = math.sqrt(draft_area / (width * height))
            if scale:
                # draft() picks the smallest DCT scale whose size is still >= the one asked for;
                # same mode, so colour conversion stays where to_rgb does it
                image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
            image.seek(0)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # a copy of the whole image otherwise, even when upright
            return to_rgb(image)
    except Exception as exc:
        raise ImageDecodeError(f"corrupt or truncated {image.format or ''} image: {exc}".replace("  ", " ")) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert every Pillow mode to 8-bit RGB, compositing transparency onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit and float greyscale: scale the used range into 8 bits rather than clipping at
        # 255; float images in [0, 1] (the usual convention for "F") are scaled up, not shown black
        array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = array.max() if array.size else 0.0
        top = peak if peak > 255 else (1.0 if image.mode == "F" and 0 < peak <= 1.0 else 255.0)
        array = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Shorter side to `spec.resize`, then the centre `spec.crop` square."""
    width, height = image.size
    scale = spec.resize / min(width, height)
    new_size = (max(spec.crop, round(width * scale)), max(spec.crop, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, _FILTERS[spec.interpolation])
    left = (new_size[0] - spec.crop) // 2
    top = (new_size[1] - spec.crop) // 2
    return image.crop((left, top, left + spec.crop, top + spec.crop))


def normalize(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB image -> float32 array 3 x H x W, scaled to [0, 1] then standardized per channel."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # H x W x 3
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


def preprocess(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """The evaluation transform: RGB image -> 3 x crop x crop float32 model input."""
    return normalize(resize_and_crop(to_rgb(image), spec), spec)


def preprocess_bytes(data: bytes, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS,
                     draft: bool = False) -> np.ndarray:
    """Encoded image -> model input; `draft` allows the reduced JPEG decode (see decode_image)."""
    return preprocess(decode_image(data, max_pixels, spec.resize if draft else None), spec)
