"""Noticing divergence, and saying how stable a run was.

`DivergenceMonitor` watches each step: too many skipped (non-finite) steps within a window, or a
loss far above its running median, means the run is diverging. The loop then rolls back to the
last good state with a lower learning rate (see train.py). `stability_report` summarises a run
for its checkpoint, and `passes_gate` decides whether a checkpoint may become `best.pt`.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import torch
from torch import nn


class TrainingDiverged(RuntimeError):
    """The run kept diverging after the allowed number of rollbacks."""


class DivergenceMonitor:
    def __init__(self, max_skips: int, window: int, loss_factor: float, num_classes: int, history: int = 100,
                 warmup: int = 20):
        self.max_skips, self.window, self.loss_factor, self.warmup = max_skips, window, loss_factor, warmup
        # Late in training the median loss is small and single hard batches sit far above it; a
        # diverging run goes far above chance level, ln(classes), so that is the floor.
        self.floor = math.log(max(num_classes, 2))
        self.recent_skips: deque[int] = deque()  # step numbers of skipped steps inside the window
        self.losses: deque[float] = deque(maxlen=history)

    def observe(self, step: int, loss: float | None) -> str | None:
        """Record one step (loss None: skipped, as non-finite or for corrupt inputs); returns why to roll
        back, or None."""
        while self.recent_skips and self.recent_skips[0] <= step - self.window:
            self.recent_skips.popleft()
        if loss is None:
            self.recent_skips.append(step)
            if len(self.recent_skips) >= self.max_skips:
                return (f"{len(self.recent_skips)} skipped steps (non-finite, or corrupt inputs) "
                        f"within {self.window} steps")
            return None
        if self.loss_factor > 0:
            # Until `warmup` losses are in, the median is too noisy to judge by; chance level is not
            # (a fresh network's loss is about ln(classes)), so an early explosion is caught as well.
            reference = (max(statistics.median(self.losses), self.floor) if len(self.losses) >= self.warmup
                         else self.floor)
            if loss > self.loss_factor * reference:
                return f"loss {loss:.3g} above {self.loss_factor:g}x max(running median, ln(classes)) = {reference:.3g}"
        self.losses.append(loss)
        return None

    def reset(self) -> None:
        """After a rollback, the old window's evidence is spent."""
        self.recent_skips.clear()


def stability_report(grad_norms: list[float], clipped: int, skipped: int, rollbacks: int, model: nn.Module) -> dict:
    """How stable the run has been so far (norms before clipping, over applied steps)."""
    applied = len(grad_norms)
    ordered = sorted(grad_norms)
    percentile = lambda q: ordered[min(applied - 1, math.ceil(q * applied) - 1)] if applied else None  # noqa: E731
    return {
        "applied_steps": applied,
        "skipped_steps": skipped,
        "rollbacks": rollbacks,
        "clip_rate": clipped / applied if applied else 0.0,
        "grad_norm_max": ordered[-1] if applied else None,
        "grad_norm_p50": percentile(0.5),
        "grad_norm_p99": percentile(0.99),
        "finite_weights": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "finite_bn_stats": all(bool(torch.isfinite(b).all()) for b in model.buffers() if b.is_floating_point()),
    }


def passes_gate(report: dict) -> bool:
    """A checkpoint with non-finite weights or batch-norm statistics is never promoted."""
    return report["finite_weights"] and report["finite_bn_stats"]
