"""Mixed precision and memory layout: which to use, and the four calls the training step makes.

`--precision auto` means bf16 on a CUDA device that supports it (Ampere and later), fp16 on older
CUDA devices, fp32 on CPU: CPU autocast works but is slower than fp32 for these convnets, so the
CPU path stays fp32 unless a precision is named explicitly (which the tests do, to run the AMP
code path here). fp16 needs loss scaling (a GradScaler); bf16 has fp32's exponent range and does
not. `--channels-last auto` puts weights and images in NHWC on CUDA, where cuDNN's tensor-core
convolutions want it, and leaves CPU tensors as they are.

The order inside a step matters, and `Precision` keeps it: scale the loss, backward, unscale
the gradients (so clipping and the gradient norms see true values), clip, then step or skip. A
scaler-skipped step (fp16 gradients overflowed at the current loss scale) goes through the same
non-finite guard as an fp32 one; the scale still has to be lowered, hence `skip`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str, device: torch.device, bf16_supported: bool | None = None) -> str:
    """`requested` ("auto", "fp32", "bf16", "fp16") -> the precision to train in on `device`."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "fp32"
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return "bf16" if bf16_supported else "fp16"


def resolve_channels_last(requested: str, device: torch.device) -> bool:
    """`requested` ("auto", "on", "off") -> whether to train in NHWC: auto = on CUDA only."""
    if requested not in ("auto", "on", "off"):
        raise ValueError(f"channels_last must be 'auto', 'on' or 'off', not {requested!r}")
    return requested == "on" or (requested == "auto" and device.type == "cuda")


@dataclass
class Precision:
    """Autocast and (for fp16) loss scaling for one training run on one device."""

    name: str  # "fp32", "bf16" or "fp16", resolved
    device: torch.device
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, name: str, device: torch.device, init_scale: float = 2.0**16) -> Precision:
        scaler = torch.amp.GradScaler(device.type, init_scale=init_scale) if name == "fp16" else None
        return cls(name, device, scaler)

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.name])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale in place: from here on they are true gradients."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)  # the guard already saw finite gradients, so this steps
            self.scaler.update()
        else:
            optimizer.step()

    def skip(self) -> None:
        """A step the guard skipped: no optimizer step, but an overflow must still lower the scale."""
        if self.scaler:
            self.scaler.update()

    @property
    def scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler else None

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)
