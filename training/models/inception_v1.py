"""GoogLeNet / Inception-v1 with batch norm, laid out like torchvision's `googlenet`.

Paper: Szegedy et al., "Going deeper with convolutions", CVPR 2015 (arXiv:1409.4842, 2014).

Deviations from the paper (all but the last two are torchvision's, kept so that
`inception_v1_bn(num_classes=1000)` has exactly torchvision's 6,624,904 parameters):
  * BatchNorm (eps 0.001) after every conv, convs without bias (from Ioffe & Szegedy 2015); the
    paper predates batch norm.
  * No local response normalisation in the stem.
  * The "5x5" branch of every Inception module uses a 3x3 conv (a long-standing torchvision quirk,
    kept for parameter and weight-layout parity).
  * Max pools use ceil_mode=True, and the pool between 4e and 5a is 2x2/2 instead of 3x3/2.
  * AdaptiveAvgPool2d(1) instead of the 7x7 average pool, so inputs other than 224 px work.
  * Classifier dropout 0.2 instead of 0.4.
  * Auxiliary heads (optional, off by default) use an adaptive average pool to 4 x 4 instead of a
    5x5/3 average pool (the same 4 x 4 at 224 px), and their 1x1 conv has batch norm.
  * Weights come from `layers.init_weights` (Kaiming normal, fan_in for the convs of the no-BN
    network), not torchvision's truncated normal.
  * `batch_norm=False` removes every batch norm (convs get their bias back): the paper's network
    in that respect, which the stability study (training/study.py) trains as "no BN".
  * `width` scales every channel count, the auxiliary heads' 128 / 1024 included (their FC input
    stays conv channels x 4 x 4); width=1.0 is the published network.
The auxiliary losses' 0.3 weight is the trainer's business (TrainConfig.aux_weight), not the model's.

Forward contract: in training mode with aux_logits=True it returns (logits, aux1, aux2); otherwise
(eval mode, or aux heads off) it returns the logits tensor only, so ONNX export never sees the heads.

Minimum input: 15 x 15 (measured): below that the map reaching maxpool3 is 1 x 1, where a
ceil-mode 3x3/2 pool has no window starting inside it. The project supports and tests >= 32 px.
forward() does not check this; callers validate against MIN_INPUT_SIZE.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from training.models.layers import ConvBNReLU, scaled

MIN_INPUT_SIZE = 15


# torchvision's BasicConv2d: the shared block with BN eps 0.001 (the value its googlenet weights use).
BasicConv = partial(ConvBNReLU, bn_eps=0.001)


class Inception(nn.Module):
    """Four parallel branches concatenated on channels; 1x1 "reduce" convs keep the 3x3s cheap.

    Channel arguments are the paper's (width 1.0); `out_channels` is the actual concatenated width,
    which the next module must take as its input because rounding each branch separately can make
    it differ from the scaled paper total.
    """

    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj, width: float = 1.0,
                 batch_norm: bool = True):
        super().__init__()
        ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj = (
            scaled(c, width) for c in (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj)
        )
        conv = partial(BasicConv, batch_norm=batch_norm)
        self.branch1 = conv(in_channels, ch1x1, 1)
        self.branch2 = nn.Sequential(conv(in_channels, ch3x3red, 1), conv(ch3x3red, ch3x3, 3, padding=1))
        # The paper's 5x5; torchvision's 3x3 (see the module docstring).
        self.branch3 = nn.Sequential(conv(in_channels, ch5x5red, 1), conv(ch5x5red, ch5x5, 3, padding=1))
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), conv(in_channels, pool_proj, 1)
        )
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every branch keeps the spatial size, so they concatenate on channels.
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier on an intermediate map; adds gradient signal to the middle of the net."""

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0, dropout: float = 0.7,
                 batch_norm: bool = True):
        super().__init__()
        conv_channels, hidden = scaled(128, width), scaled(1024, width)
        self.conv = BasicConv(in_channels, conv_channels, 1, batch_norm=batch_norm)
        self.fc1 = nn.Linear(conv_channels * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shapes at width 1.0 for the head on 4a (512 channels in); the map size does not matter.
        x = nn.functional.adaptive_avg_pool2d(x, (4, 4))  # N x 512 x 4 x 4
        x = self.conv(x)  # N x 128 x 4 x 4
        x = torch.flatten(x, 1)  # N x 2048
        x = nn.functional.relu(self.fc1(x), inplace=True)  # N x 1024
        x = self.dropout(x)
        return self.fc2(x)  # N x num_classes


class InceptionV1(nn.Module):
    """GoogLeNet with batch norm (unless `batch_norm=False`). Weights are PyTorch defaults until
    `init_weights` (`build_model`) runs."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, aux_logits: bool = False, dropout: float = 0.2,
                 batch_norm: bool = True):
        super().__init__()
        self.aux_logits = aux_logits
        c64, c192 = scaled(64, width), scaled(192, width)
        conv = partial(BasicConv, batch_norm=batch_norm)
        inception = partial(Inception, width=width, batch_norm=batch_norm)

        self.conv1 = conv(3, c64, 7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = conv(c64, c64, 1)
        self.conv3 = conv(c64, c192, 3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception3a = inception(c192, 64, 96, 128, 16, 32, 32)
        self.inception3b = inception(self.inception3a.out_channels, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception4a = inception(self.inception3b.out_channels, 192, 96, 208, 16, 48, 64)
        self.inception4b = inception(self.inception4a.out_channels, 160, 112, 224, 24, 64, 64)
        self.inception4c = inception(self.inception4b.out_channels, 128, 128, 256, 24, 64, 64)
        self.inception4d = inception(self.inception4c.out_channels, 112, 144, 288, 32, 64, 64)
        self.inception4e = inception(self.inception4d.out_channels, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)

        self.inception5a = inception(self.inception4e.out_channels, 256, 160, 320, 32, 128, 128)
        self.inception5b = inception(self.inception5a.out_channels, 384, 192, 384, 48, 128, 128)

        # Built only when asked for, so the default model has torchvision's parameter count and an
        # exported graph carries no dead weights.
        if aux_logits:
            self.aux1 = InceptionAux(self.inception4a.out_channels, num_classes, width, batch_norm=batch_norm)
            self.aux2 = InceptionAux(self.inception4d.out_channels, num_classes, width, batch_norm=batch_norm)
        else:
            self.aux1 = self.aux2 = None

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.inception5b.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Shapes at a 64 x 64 input, width 1.0 (at 224 px the maps are 112, 56, 28, 14, 7 instead of
        # 32, 16, 8, 4, 2).
        x = self.conv1(x)  # N x 64 x 32 x 32
        x = self.maxpool1(x)  # N x 64 x 16 x 16
        x = self.conv2(x)  # N x 64 x 16 x 16
        x = self.conv3(x)  # N x 192 x 16 x 16
        x = self.maxpool2(x)  # N x 192 x 8 x 8

        x = self.inception3a(x)  # N x 256 x 8 x 8
        x = self.inception3b(x)  # N x 480 x 8 x 8
        x = self.maxpool3(x)  # N x 480 x 4 x 4

        x = self.inception4a(x)  # N x 512 x 4 x 4
        with_aux = self.training and self.aux1 is not None
        aux1 = self.aux1(x) if with_aux else None  # N x num_classes
        x = self.inception4b(x)  # N x 512 x 4 x 4
        x = self.inception4c(x)  # N x 512 x 4 x 4
        x = self.inception4d(x)  # N x 528 x 4 x 4
        aux2 = self.aux2(x) if with_aux else None  # N x num_classes
        x = self.inception4e(x)  # N x 832 x 4 x 4
        x = self.maxpool4(x)  # N x 832 x 2 x 2

        x = self.inception5a(x)  # N x 832 x 2 x 2
        x = self.inception5b(x)  # N x 1024 x 2 x 2

        x = self.avgpool(x)  # N x 1024 x 1 x 1
        x = torch.flatten(x, 1)  # N x 1024
        x = self.fc(self.dropout(x))  # N x num_classes
        if with_aux:
            return x, aux1, aux2
        return x


def inception_v1_bn(
    num_classes: int = 1000, width: float = 1.0, aux_logits: bool = False, dropout: float = 0.2, batch_norm: bool = True
) -> InceptionV1:
    """GoogLeNet with batch norm; aux_logits adds the two auxiliary heads (used in training only);
    batch_norm=False leaves batch norm out (the stability study's "no BN" Inception)."""
    return InceptionV1(num_classes=num_classes, width=width, aux_logits=aux_logits, dropout=dropout,
                       batch_norm=batch_norm)
