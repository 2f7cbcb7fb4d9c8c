"""Faults injected into a real training run, and the measurement of each update: the study's step hook.

`StepProbe` is what the study passes to `training.train.train(config, step_hook=...)`. The loop
calls it before every step with the step number, the model, the batch and the learning rate, and
trains on what it returns. It changes nothing unless a fault covers that step, so a run with a
probe and no faults is the run without one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FAULT_KINDS = ("nan_image", "scale_inputs", "scale_lr", "shift_labels")


@dataclass(frozen=True)
class Fault:
    """One fault, as it happens in practice, from step `step` for `steps` steps.

    nan_image     the batch's first image is NaN (a decoder that returned garbage)
    scale_inputs  every pixel value times `scale` (a batch that skipped normalisation, or a corrupt shard)
    scale_lr      the learning rate times `scale` (a mis-set schedule)
    shift_labels  every label moved to the next class (a shard with an off-by-one label map)
    """

    kind: str
    step: int
    steps: int = 1
    scale: float = 1.0

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {', '.join(FAULT_KINDS)}, not {self.kind!r}")

    def covers(self, step: int) -> bool:
        return self.step <= step < self.step + self.steps

    def apply(self, images: torch.Tensor, targets: torch.Tensor, lr: float,
              num_classes: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        if self.kind == "nan_image":
            images = images.clone()
            images[0] = float("nan")
        elif self.kind == "scale_inputs":
            images = images * self.scale
        elif self.kind == "scale_lr":
            lr = lr * self.scale
        else:
            targets = (targets + 1) % num_classes
        return images, targets, lr


class StepProbe:
    """The study's step hook: injects `faults` and measures the relative update ||w' - w|| / ||w||
    (all parameters together) of every `update_every`-th step."""

    def __init__(self, faults: tuple[Fault, ...] = (), update_every: int = 10, num_classes: int = 10):
        self.faults, self.update_every, self.num_classes = faults, update_every, num_classes
        self.before: tuple[int, list[torch.Tensor]] | None = None  # (step, weights before it)
        self.updates: dict[int, float] = {}  # step -> relative update it made
        self.faulty_steps: list[int] = []

    @torch.no_grad()
    def __call__(self, step: int, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 lr: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        weights = [p.detach() for p in model.parameters()]
        if self.before is not None:  # the weights now are the ones after the step measured
            measured, old = self.before
            change = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(torch._foreach_sub(weights, old))))
            size = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(old)))
            self.updates[measured] = (change / size).item()
            self.before = None
        if self.update_every and step % self.update_every == 0:
            self.before = (step, [w.clone() for w in weights])
        for fault in self.faults:
            if fault.covers(step):
                images, targets, lr = fault.apply(images, targets, lr, self.num_classes)
                self.faulty_steps.append(step)
        return images, targets, lr
