"""Model registry: architecture name -> builder.

Checkpoints store the name and the builder arguments, so `build_model(arch, **model_args)` rebuilds
any saved model. To add an architecture, write one file `training/models/<name>.py` (blocks ->
model -> builder, sharing `layers.ConvBNReLU`) and add its builder to MODELS.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

# Import the modules, not the builders: `from .alexnet import alexnet` would shadow the submodule
# `training.models.alexnet` with the function of the same name.
from training.models import alexnet, inception_v1, inception_v3
from training.models.layers import init_weights

MODELS: dict[str, Callable[..., nn.Module]] = {
    "alexnet": alexnet.alexnet,
    "alexnet_bn": alexnet.alexnet_bn,
    "inception_v1_bn": inception_v1.inception_v1_bn,
    "inception_v3": inception_v3.inception_v3,
}


def build_model(arch: str, num_classes: int, **model_args) -> nn.Module:
    """Build `arch` for `num_classes` classes with the builder's extra arguments (width, dropout, ...).

    Weights are freshly initialised with `init_weights`; a checkpoint's state dict overwrites them.
    """
    if arch not in MODELS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(sorted(MODELS))}")
    model = MODELS[arch](num_classes=num_classes, **model_args)
    init_weights(model)
    return model


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not (the number model zoos quote)."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "build_model", "count_parameters", "init_weights"]
