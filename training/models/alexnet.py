"""AlexNet, single-tower, as torchvision ships it.

Papers: Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep Convolutional Neural
Networks", NeurIPS 2012; channel widths from Krizhevsky, "One weird trick for parallelizing
convolutional neural networks", arXiv:1404.5997, 2014.

Deviations from the 2012 paper:
  * One tower instead of two GPU halves, so every conv sees all channels of the layer before it.
  * Conv widths 64-192-384-256-256 (the 2014 "one weird trick" variant) instead of 96-256-384-384-256.
  * conv1 has padding 2, so the paper's nominal 224 px input actually works (the paper needs 227).
  * No local response normalisation.
  * AdaptiveAvgPool2d(6, 6) before the classifier, so any input >= MIN_INPUT_SIZE is accepted; at
    224 px the map is already 6 x 6 and the pool is the identity.
  * Dropout is applied to the inputs of FC1 and FC2 (torchvision's placement), not their outputs.
  * Weights come from `layers.init_weights` (Kaiming normal convs: fan_in without BN, fan_out with
    it; N(0, 0.01) linears, zero biases), not the paper's N(0, 0.01) everywhere with some biases set to 1.
  * `width` scales conv channels and the FC hidden size (4096); width=1.0 is the published network.
  * `alexnet_bn` adds BatchNorm after every conv (convs then drop their bias). This is not in either
    paper; its classifier is unchanged (same FC layers, same dropout).

Minimum input: 63 x 63. The stem (11x11/4, pad 2) and three 3x3/2 max pools need 63 px to leave
a 1 x 1 map before the adaptive pool: 63 -> 15 -> 7 -> 3 -> 1. At 62 px the last pool gets a 2 x 2
map, smaller than its window. forward() does not check this, to stay lean for export: callers
validate against MIN_INPUT_SIZE.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from training.models.layers import ConvBNReLU, scaled

MIN_INPUT_SIZE = 63


class AlexNet(nn.Module):
    """Single-tower AlexNet; `alexnet(num_classes=1000)` has 61,100,840 parameters like torchvision's.

    Weights are PyTorch defaults until `init_weights` runs (`build_model` does that).
    """

    def __init__(self, num_classes: int = 1000, width: float = 1.0, batch_norm: bool = False, dropout: float = 0.5):
        super().__init__()
        c1, c2, c3, c4, c5 = (scaled(c, width) for c in (64, 192, 384, 256, 256))
        hidden = scaled(4096, width)

        # Output shapes at a 64 x 64 input and width 1.0 (at 224 px: 55, 27, 27, 13, 13, 13, 13, 6).
        self.features = nn.Sequential(
            OrderedDict(
                conv1=ConvBNReLU(3, c1, 11, stride=4, padding=2, batch_norm=batch_norm),  # N x 64 x 15 x 15
                pool1=nn.MaxPool2d(3, 2),  # N x 64 x 7 x 7
                conv2=ConvBNReLU(c1, c2, 5, padding=2, batch_norm=batch_norm),  # N x 192 x 7 x 7
                pool2=nn.MaxPool2d(3, 2),  # N x 192 x 3 x 3
                conv3=ConvBNReLU(c2, c3, 3, padding=1, batch_norm=batch_norm),  # N x 384 x 3 x 3
                conv4=ConvBNReLU(c3, c4, 3, padding=1, batch_norm=batch_norm),  # N x 256 x 3 x 3
                conv5=ConvBNReLU(c4, c5, 3, padding=1, batch_norm=batch_norm),  # N x 256 x 3 x 3
                pool5=nn.MaxPool2d(3, 2),  # N x 256 x 1 x 1
            )
        )
        # Fixes the classifier's input size whatever the image size; below 224 px it upsamples by
        # repetition, which adds no information but keeps one set of FC weights for every input size.
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            OrderedDict(
                drop1=nn.Dropout(dropout),
                fc1=nn.Linear(c5 * 6 * 6, hidden),
                relu1=nn.ReLU(inplace=True),
                drop2=nn.Dropout(dropout),
                fc2=nn.Linear(hidden, hidden),
                relu2=nn.ReLU(inplace=True),
                fc3=nn.Linear(hidden, num_classes),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shapes at a 64 x 64 input, width 1.0.
        x = self.features(x)  # N x 256 x 1 x 1
        x = self.avgpool(x)  # N x 256 x 6 x 6
        x = torch.flatten(x, 1)  # N x 9216
        return self.classifier(x)  # N x num_classes


def alexnet(num_classes: int = 1000, width: float = 1.0, dropout: float = 0.5) -> AlexNet:
    """torchvision's AlexNet (no batch norm)."""
    return AlexNet(num_classes=num_classes, width=width, batch_norm=False, dropout=dropout)


def alexnet_bn(num_classes: int = 1000, width: float = 1.0, dropout: float = 0.5) -> AlexNet:
    """AlexNet with BatchNorm after every conv; the FC classifier (with dropout) is unchanged."""
    return AlexNet(num_classes=num_classes, width=width, batch_norm=True, dropout=dropout)
