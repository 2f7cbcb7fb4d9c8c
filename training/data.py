"""ImageFolder data sets: `ROOT/<split>/<class>/<image>`, the layout torchvision and most tools use.

The data-loading workers decode and augment; they hand the training process uint8 images
(N x S x S x 3: a quarter of float32's bytes through the worker queues and to the GPU), which
`DeviceBatches` normalises on the device, bit for bit as `service.preprocessing.normalize` does:
`PixelNormalizer` repeats its arithmetic, and checks at start that it gives the service's value for
every byte in every channel (falling back to looking each byte up in a table of those values).

- Evaluation images: `service.preprocessing` (full decode, resize, centre crop), as the service sees them.
- Training images: a reduced JPEG decode that keeps the smallest random crop at full resolution
  (`ImageAugment.draft_area`), then training/augment.py's per-image transform.

Randomness: `EpochSampler`, in the training process, draws each epoch's order and one seed per
sample from (seed, epoch) alone, and a worker augments a sample from its seed only. So the
workers persist across epochs, and a resumed run sees exactly the batches an uninterrupted one
would (a worker's own random state never matters).

Unreadable images (missing, corrupt, truncated, over the pixel limit): in training the next
readable image of the data set takes the bad one's place in its batch, so batch shapes and the
sample count per epoch never change and a resumed run still repeats the same batches; in
evaluation the image is left out (its accuracy is not guessed). Either way the batch carries the
path and reason to the training process, where `UnreadableImages` logs each file once to
RUN/skipped.jsonl (or, with --bad-images fail, stops the run naming it).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.preprocessing import (
    ImageDecodeError,
    PreprocessSpec,
    decode_image,
    find_images,
    normalize,
    resize_and_crop,
)
from training.augment import ImageAugment


def find_classes(split_dir: Path) -> list[str]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>)")
    return classes


class UnreadableImageError(ValueError):
    """An image that cannot be read, under --bad-images fail; the message starts with its path."""


class ImageFolder(torch.utils.data.Dataset):
    """(uint8 image S x S x 3 or None, class index, unreadable files met) from one split folder.

    With `augment` (training) a key is an (index, seed) pair from EpochSampler; without, an index.
    """

    def __init__(self, split_dir: str | Path, classes: list[str], spec: PreprocessSpec,
                 augment: ImageAugment | None = None):
        self.root = Path(split_dir)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such split folder")
        self.classes, self.spec, self.augment = classes, spec, augment
        self.samples: list[tuple[Path, int]] = []
        for index, name in enumerate(classes):
            folder = self.root / name
            if folder.is_dir():
                self.samples += [(path, index) for path in find_images(folder)]
        if not self.samples:
            raise FileNotFoundError(f"{self.root}: no images found in the class folders")
        self.known_bad: dict[int, str] = {}  # per worker: files that failed once are not read again

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor | None, int, list[tuple[str, str]]]:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        unreadable = []
        for offset in range(len(self.samples)):
            position = (index + offset) % len(self.samples)
            path, target = self.samples[position]
            try:
                if position in self.known_bad:
                    raise ImageDecodeError(self.known_bad[position])
                pixels = self.load(path, seed)
            except (ImageDecodeError, OSError) as exc:
                self.known_bad[position] = str(exc)
                unreadable.append((str(path), str(exc)))
                if self.augment is None:
                    return None, target, unreadable
                continue
            return torch.from_numpy(pixels), target, unreadable
        raise UnreadableImageError(f"{self.root}: not one image could be read ({unreadable[0][1]}, ...)")

    def load(self, path: Path, seed: int) -> np.ndarray:
        """The image's pixels as the model will see them, before normalisation: S x S x 3 uint8."""
        if self.augment is None:
            image = resize_and_crop(decode_image(path.read_bytes()), self.spec)
        else:
            image = self.augment(decode_image(path.read_bytes(), draft_area=self.augment.draft_area),
                                 random.Random(seed))
        return np.array(image, dtype=np.uint8)


def make_loader(dataset: ImageFolder, batch_size: int, workers: int, sampler: EpochSampler | None = None,
                pin: bool = False) -> torch.utils.data.DataLoader:
    """Batches of `dataset`, in `sampler`'s order (training) or in file order (evaluation).

    `workers` -1: one per CPU this process may use, shared among the torchrun processes on the
    machine. The workers persist across epochs: nothing about a batch depends on their state.
    """
    if workers < 0:
        from service.inference import container_cpus  # (it imports onnxruntime: only when asked)

        workers = max(1, container_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=sampler is not None and len(sampler) > batch_size,
        num_workers=workers, persistent_workers=workers > 0, collate_fn=collate, pin_memory=pin,
        # Starting an iteration draws the workers' base seed (which no sample uses) from this generator;
        # left to the global one, that draw would happen once in a run but again after a resume, and
        # shift the global state (dropout's) that the checkpoint restores.
        generator=torch.Generator().manual_seed(0))


def collate(samples: list) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Stack a batch, leaving out images that could not be read (evaluation only: training replaced them)."""
    unreadable = [record for _, _, records in samples for record in records]
    kept = [(image, target) for image, target, _ in samples if image is not None]
    images = torch.stack([image for image, _ in kept]) if kept else torch.empty(0, dtype=torch.uint8)
    return images, torch.tensor([target for _, target in kept], dtype=torch.long), unreadable


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of an epoch: (index, augmentation seed) keys in an order seeded by
    (seed, epoch), as DistributedSampler orders them; the tail that does not divide among `world`
    processes is dropped, so every process takes the same number of steps."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.seed, self.rank, self.world, self.epoch = size, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        seeds = torch.randint(0, 2**62, (self.size,), generator=generator).tolist()
        for position in range(self.rank, len(self) * self.world, self.world):
            yield order[position], seeds[position]


class UnreadableImages:
    """The images the workers could not read: each file once in `log` (JSONL), counted per epoch.

    Under `policy` "fail" the first one stops the run (UnreadableImageError, naming it). Files are
    logged at the end of each epoch, with every process's (under torchrun), so a killed run's log
    covers what its checkpoint covers; a resumed run keeps the lines logged before.
    """

    def __init__(self, policy: str, log: Path | None, resume: bool = False):
        self.policy, self.log = policy, log
        self.met: dict[str, tuple[str, str]] = {}  # this epoch: path -> (split, reason)
        self.seen: set[str] = set()
        if log and resume and log.exists():
            self.seen = {record["path"] for record in read_jsonl(log)}
        elif log:
            log.write_text("")

    def add(self, split: str, records: list[tuple[str, str]]) -> None:
        for path, reason in records:
            if self.policy == "fail":
                raise UnreadableImageError(f"{path}: {reason} (with --bad-images skip it is logged and left out)")
            self.met.setdefault(path, (split, reason))

    def end_epoch(self, epoch: int | str, gather=lambda met: [met]) -> int:
        """Log the files met since the last call that were never logged; returns how many were met."""
        met = {}
        for part in gather(self.met):  # every process's, in rank order
            met.update(part)
        self.met = {}
        new = [(path, split, reason) for path, (split, reason) in sorted(met.items()) if path not in self.seen]
        self.seen.update(path for path, _, _ in new)
        if self.log and new:
            with open(self.log, "a") as handle:
                handle.writelines(json.dumps({"path": path, "split": split, "error": reason, "epoch": epoch}) + "\n"
                                  for path, split, reason in new)
            for path, _, reason in new[:5]:
                print(f"  skipped unreadable image {path}: {reason}", file=sys.stderr)
            if len(new) > 5:
                print(f"  ... and {len(new) - 5} more: {self.log}", file=sys.stderr)
        return len(met)


def read_jsonl(path: Path) -> list[dict]:
    """A JSONL file's records, without a half-written last line."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def pixel_table(spec: PreprocessSpec) -> torch.Tensor:
    """3 x 256 float32: what `service.preprocessing.normalize` makes of each byte value in each channel."""
    ramp = Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2))
    return torch.from_numpy(normalize(ramp, spec)[:, 0, :].copy())


def normalize_batch(images: torch.Tensor, table: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float32 N x 3 x H x W model input, on the images' device, by table lookup."""
    offsets = torch.arange(0, 3 * 256, 256, dtype=torch.int64, device=images.device)  # channel c's row in `table`
    pixels = torch.take(table, images.long() + offsets)  # N x H x W x 3
    pixels = pixels.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last as it is
    return pixels if channels_last else pixels.contiguous()


class PixelNormalizer:
    """uint8 N x H x W x 3 -> float32 N x 3 x H x W, on the images' device, bit for bit the service's.

    The service computes (x / 255 - mean) / std in float32; so does this, in place, in NCHW order, about
    8 times faster on a CPU than the table lookup of `normalize_batch` (docs/benchmarks.md, data
    loading). The operations are elementwise and per channel, so agreeing with the table on all 256
    values of each channel means agreeing on every image: checked once here, on the device that will
    run it, with the table as the fallback.
    """

    def __init__(self, spec: PreprocessSpec, device: torch.device | str = "cpu"):
        self.table = pixel_table(spec).to(device)
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=device)[:, None, None]  # 3 x 1 x 1
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=device)[:, None, None]
        every_byte = torch.arange(256, dtype=torch.uint8, device=device)[None, :, None, None].expand(1, 256, 1, 3)
        self.arithmetic = torch.equal(self.compute(every_byte.contiguous()), normalize_batch(every_byte, self.table))

    def compute(self, images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        pixels = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=memory_format)  # N x 3 x H x W
        return pixels.div_(255.0).sub_(self.mean).div_(self.std)

    def __call__(self, images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        if self.arithmetic:
            return self.compute(images, channels_last)
        return normalize_batch(images, self.table, channels_last)


def input_limit(spec: PreprocessSpec) -> float:
    """The largest |value| a training batch may hold: 4 times the most the preprocessing can produce
    ((0 or 1 - mean) / std over the channels; augmentation only mixes or zeroes normalised values), and
    at least 10. The guard skips a batch above it or with a non-finite value (training/train.py): one
    that skipped normalisation (0-255) or came out of a broken decoder. Such a batch leaves no trace in
    the loss when batch norm follows the first conv, but its statistics would poison BN's running
    averages, and evaluation with them."""
    peak = max(max(abs(0.0 - m), abs(1.0 - m)) / s if s > 0 else math.inf for m, s in zip(spec.mean, spec.std,
                                                                                             strict=True))
    return max(4.0 * peak, 10.0)


class DeviceBatches:
    """A DataLoader's uint8 batches as normalised float32 batches on `device`, unreadable images reported."""

    def __init__(self, loader: torch.utils.data.DataLoader, spec: PreprocessSpec, device: torch.device,
                 unreadable: UnreadableImages, split: str, channels_last: bool = False):
        self.loader, self.device, self.unreadable, self.split = loader, device, unreadable, split
        self.normalize, self.channels_last = PixelNormalizer(spec, device), channels_last

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch: the sampler draws that epoch's order and augmentation seeds."""
        self.loader.sampler.set_epoch(epoch)

    def __iter__(self):
        for images, targets, unreadable in self.loader:
            self.unreadable.add(self.split, unreadable)
            if len(targets):
                images = images.to(self.device, non_blocking=True)
                yield (self.normalize(images, self.channels_last),
                       targets.to(self.device, non_blocking=True))
