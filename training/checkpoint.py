"""Self-describing checkpoints: everything export needs to rebuild the model, and nothing pickled.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)` (no arbitrary code runs when a file is opened) and it is written
atomically (temporary file + rename), so a crash mid-write never leaves a broken file behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from training.models import build_model

FORMAT = "keel-checkpoint/1"
REQUIRED_KEYS = ("format", "arch", "model_args", "labels", "preprocessing", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not ours; the message starts with its path."""


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write `payload` (see `checkpoint_payload`) to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": FORMAT, **payload}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def checkpoint_payload(
    model: nn.Module, *, arch: str, model_args: dict, labels: list[str], preprocessing: dict, **extra
) -> dict:
    """The keys every Keel checkpoint carries; `extra` adds config, metrics, optimizer state, ..."""
    return {
        "arch": arch,
        "model_args": dict(model_args),
        "labels": list(labels),
        "preprocessing": dict(preprocessing),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def load_checkpoint(path: str | Path) -> dict:
    """Load and validate a checkpoint, or raise CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {reason}") from None
    return check_checkpoint(checkpoint, path)


def check_checkpoint(checkpoint, path: str | Path) -> dict:
    """`checkpoint` (a loaded file) if it is a Keel checkpoint, else CheckpointError naming `path`."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        plain = isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor)
                                                                    for v in checkpoint.values())
        raise CheckpointError(f"{path}: not a Keel checkpoint (expected format {FORMAT!r})"
                              + ("; a torchvision state dict becomes one with `python -m training.convert`"
                                 if plain else ""))
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: Keel checkpoint is missing {', '.join(missing)}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict) -> nn.Module:
    """Rebuild the architecture from the checkpoint alone and load its weights (eval mode)."""
    model = build_model(checkpoint["arch"], **checkpoint["model_args"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
