"""Building blocks shared by every architecture in `training.models`.

There is exactly one conv block (`ConvBNReLU`) so that AlexNet, Inception and anything added later
differ only in how they wire it, and `init_weights` is the single place weights get their start.
"""

from __future__ import annotations

from torch import nn


class ConvBNReLU(nn.Sequential):
    """Conv2d -> BatchNorm2d (optional) -> ReLU.

    The conv carries a bias only without batch norm: BN's learned shift makes a conv bias redundant,
    so dropping it keeps parameter counts equal to the reference implementations. kernel_size, stride
    and padding go straight to nn.Conv2d: an int, or an (h, w) pair for asymmetric kernels like 1x7.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        batch_norm: bool = True,
        bn_eps: float = 1e-5,
    ):
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=not batch_norm)
        ]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels, eps=bn_eps))
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def init_weights(model: nn.Module) -> None:
    """Initialise `model` in place.

    Kaiming with mode="fan_out" keeps the gradient variance stable through ReLU stacks in the backward
    pass, and the batch norm after the conv puts the forward scale right. A conv with no batch norm
    after it (it has a bias: `ConvBNReLU`) gets mode="fan_in" instead, He et al.'s forward-preserving
    choice, since nothing re-normalises its output: with fan_out, every 1x1 reduction of a no-BN
    Inception multiplies the activations' variance by fan_in / fan_out, and the network starts with
    logits of standard deviation 4.8 instead of 0.06 (width 0.125, 64 px). The small normal on Linear
    layers keeps the initial logits near zero (near-uniform softmax).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            mode = "fan_out" if module.bias is None else "fan_in"
            nn.init.kaiming_normal_(module.weight, mode=mode, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)


def scaled(channels: int, width: float) -> int:
    """`channels` times the width multiplier; width=1.0 returns `channels` unchanged.

    The floor of 8 stops very thin models from collapsing a branch to one or two channels.
    """
    if width <= 0:
        raise ValueError(f"width must be positive, not {width}")
    return max(8, round(channels * width))
