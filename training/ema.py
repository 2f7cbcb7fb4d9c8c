"""An exponential moving average of a model's weights (Polyak averaging), evaluated beside the model.

As timm's ModelEma and torchvision's reference `--model-ema`: after every applied optimizer step,
ema = d * ema + (1 - d) * weights, for the parameters and the batch-norm running statistics alike
(integer buffers, such as batch norm's step count, are copied). Early on the average would be
dominated by the random initial weights, so d ramps up as min(decay, (1 + n) / (10 + n)) after n
updates (TensorFlow's ExponentialMovingAverage with num_updates); decay 0 makes the average the model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    def __init__(self, model: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), not {decay}")
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (after an optimizer step)."""
        decay = self.current_decay()
        self.updates += 1
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values(), strict=True))
        floats = [(average, current) for average, current in pairs if average.is_floating_point()]
        # one fused call over every tensor (as timm's ModelEmaV3); at weight 1 lerp returns `current` exactly
        torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - decay)
        for average, current in pairs:
            if not average.is_floating_point():
                average.copy_(current)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "state_dict": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.module.load_state_dict(state["state_dict"])
