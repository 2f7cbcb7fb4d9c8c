"""Inception-v3, laid out like torchvision's `inception_v3` (same modules, names and weight shapes).

Paper: Szegedy, Vanhoucke, Ioffe, Shlens & Wojna, "Rethinking the Inception Architecture for
Computer Vision", CVPR 2016 (arXiv:1512.00567, 2015).

Deviations from the paper (all but the last three are torchvision's, kept so that
`inception_v3(num_classes=1000)` has exactly torchvision's 27,161,264 parameters, 23,834,568
without the auxiliary head):
  * BatchNorm (eps 0.001) after every conv, convs without bias; the auxiliary head's FC is not
    batch-normalised (the paper's "BN-auxiliary" normalises it too).
  * torchvision's module layout (that of the released TF-slim graph), which differs in places from
    the paper's Table 1: e.g. after the first max pool the stem is 1x1 80 -> 3x3 192 -> max pool.
  * The auxiliary head is 5x5/3 avg pool -> 1x1 conv 128 -> 5x5 conv 768 -> FC, without dropout.
  * AdaptiveAvgPool2d(1) instead of the final 8x8 average pool, so inputs other than 299 px work.
  * No input transform (torchvision's transform_input, which re-maps ImageNet-normalised input to
    [-1, 1] for its pretrained weights): Keel normalises in preprocessing and feeds that as is.
  * Weights come from `layers.init_weights` (Kaiming normal), not torchvision's truncated normal.
  * `width` scales every channel count, the auxiliary head's included; each block reports its real
    output width so per-branch rounding never mismatches the next block. width=1.0 is the paper's.
Label smoothing, RMSProp and the auxiliary loss weight (TrainConfig.aux_weight) are the trainer's
business, not the model's.

Forward contract (as inception_v1): in training mode with aux_logits=True it returns (logits, aux);
otherwise (eval mode, or aux head off) the logits tensor only, so ONNX export never sees the head.

Minimum input (computed from the layer arithmetic and measured): 75 x 75 without the auxiliary head
(eval mode, export, aux_logits=False): 75 -> 37 -> 35 -> 17 -> 15 -> 7 (35 x 35 stage) -> 3 (17 x 17
stage) -> 1 (8 x 8 stage); at 74 px the 17 x 17 stage is 2 x 2, smaller than Mixed_7a's 3x3/2 conv.
Training with the auxiliary head needs 299 x 299, the paper's size: the head's 5x5/3 pool and 5x5
conv need a 17 x 17 map at that stage (17 -> 5 -> 1), and 298 px leaves 16 x 16 (-> 4, too small
for the 5x5 conv). Train-mode batch norm on a 1 x 1 map (the head's last conv always, the 8 x 8
stage for small inputs) also needs a batch of at least 2. forward() checks none of this: callers
validate against MIN_INPUT_SIZE, or MIN_INPUT_SIZE_AUX when training with aux_logits=True.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from training.models.layers import ConvBNReLU, scaled

MIN_INPUT_SIZE = 75  # eval mode, export, or aux_logits=False
MIN_INPUT_SIZE_AUX = 299  # training mode with aux_logits=True

# torchvision's BasicConv2d: the shared block with BN eps 0.001 (the value its weights use).
BasicConv = partial(ConvBNReLU, bn_eps=0.001)


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.avg_pool2d(x, kernel_size=3, stride=1, padding=1)


class InceptionA(nn.Module):
    """35 x 35 module: 1x1, 5x5, double 3x3 and pooled branches (the paper's Figure 5, roughly)."""

    def __init__(self, in_channels: int, pool_features: int, width: float = 1.0):
        super().__init__()
        c48, c64, c96, pool = (scaled(c, width) for c in (48, 64, 96, pool_features))
        self.branch1x1 = BasicConv(in_channels, c64, 1)
        self.branch5x5_1 = BasicConv(in_channels, c48, 1)
        self.branch5x5_2 = BasicConv(c48, c64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(in_channels, c64, 1)
        self.branch3x3dbl_2 = BasicConv(c64, c96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(c96, c96, 3, padding=1)
        self.branch_pool = BasicConv(in_channels, pool, 1)
        self.out_channels = c64 + c64 + c96 + pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: strided 3x3, strided double 3x3 and max pool side by side (Figure 10)."""

    def __init__(self, in_channels: int, width: float = 1.0):
        super().__init__()
        c64, c96, c384 = (scaled(c, width) for c in (64, 96, 384))
        self.branch3x3 = BasicConv(in_channels, c384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv(in_channels, c64, 1)
        self.branch3x3dbl_2 = BasicConv(c64, c96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(c96, c96, 3, stride=2)
        self.out_channels = c384 + c96 + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = nn.functional.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, pool], 1)


class InceptionC(nn.Module):
    """17 x 17 module: n x n convs factorised into 1 x 7 and 7 x 1 (Figure 6)."""

    def __init__(self, in_channels: int, channels_7x7: int, width: float = 1.0):
        super().__init__()
        c7, c192 = scaled(channels_7x7, width), scaled(192, width)
        self.branch1x1 = BasicConv(in_channels, c192, 1)
        self.branch7x7_1 = BasicConv(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv(c7, c192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv(c7, c192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv(in_channels, c192, 1)
        self.out_channels = 4 * c192

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: strided 3x3 after 1x1, strided 3x3 after 1x7/7x1, and max pool."""

    def __init__(self, in_channels: int, width: float = 1.0):
        super().__init__()
        c192, c320 = scaled(192, width), scaled(320, width)
        self.branch3x3_1 = BasicConv(in_channels, c192, 1)
        self.branch3x3_2 = BasicConv(c192, c320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv(in_channels, c192, 1)
        self.branch7x7x3_2 = BasicConv(c192, c192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv(c192, c192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv(c192, c192, 3, stride=2)
        self.out_channels = c320 + c192 + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        pool = nn.functional.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, pool], 1)


class InceptionE(nn.Module):
    """8 x 8 module: 3x3 outputs split into parallel 1 x 3 and 3 x 1 (Figure 7), for wide features."""

    def __init__(self, in_channels: int, width: float = 1.0):
        super().__init__()
        c192, c320, c384, c448 = (scaled(c, width) for c in (192, 320, 384, 448))
        self.branch1x1 = BasicConv(in_channels, c320, 1)
        self.branch3x3_1 = BasicConv(in_channels, c384, 1)
        self.branch3x3_2a = BasicConv(c384, c384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv(c384, c384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv(in_channels, c448, 1)
        self.branch3x3dbl_2 = BasicConv(c448, c384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv(c384, c384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv(c384, c384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv(in_channels, c192, 1)
        self.out_channels = c320 + 4 * c384 + c192

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(_avg_pool(x))], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier on the last 17 x 17 map; the paper finds it acts as a regulariser."""

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0):
        super().__init__()
        c128, c768 = scaled(128, width), scaled(768, width)
        self.conv0 = BasicConv(in_channels, c128, 1)
        self.conv1 = BasicConv(c128, c768, 5)
        self.fc = nn.Linear(c768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shapes at 299 px, width 1.0; a map under 17 x 17 here fails in conv1 (see MIN_INPUT_SIZE_AUX).
        x = nn.functional.avg_pool2d(x, kernel_size=5, stride=3)  # N x 768 x 5 x 5
        x = self.conv0(x)  # N x 128 x 5 x 5
        x = self.conv1(x)  # N x 768 x 1 x 1
        x = nn.functional.adaptive_avg_pool2d(x, 1)  # N x 768 x 1 x 1
        return self.fc(torch.flatten(x, 1))  # N x num_classes


class InceptionV3(nn.Module):
    """Inception-v3. Weights are PyTorch defaults until `init_weights` (`build_model`) runs."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, aux_logits: bool = True, dropout: float = 0.5):
        super().__init__()
        self.aux_logits = aux_logits
        c32, c64, c80, c192 = (scaled(c, width) for c in (32, 64, 80, 192))

        self.Conv2d_1a_3x3 = BasicConv(3, c32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv(c32, c32, 3)
        self.Conv2d_2b_3x3 = BasicConv(c32, c64, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv(c64, c80, 1)
        self.Conv2d_4a_3x3 = BasicConv(c80, c192, 3)
        self.maxpool2 = nn.MaxPool2d(3, stride=2)

        self.Mixed_5b = InceptionA(c192, pool_features=32, width=width)
        self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, pool_features=64, width=width)
        self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, pool_features=64, width=width)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, width=width)
        self.Mixed_6b = InceptionC(self.Mixed_6a.out_channels, channels_7x7=128, width=width)
        self.Mixed_6c = InceptionC(self.Mixed_6b.out_channels, channels_7x7=160, width=width)
        self.Mixed_6d = InceptionC(self.Mixed_6c.out_channels, channels_7x7=160, width=width)
        self.Mixed_6e = InceptionC(self.Mixed_6d.out_channels, channels_7x7=192, width=width)
        # Built only when asked for, so an aux-free model carries no dead weights into the export.
        self.AuxLogits = InceptionAux(self.Mixed_6e.out_channels, num_classes, width) if aux_logits else None
        self.Mixed_7a = InceptionD(self.Mixed_6e.out_channels, width=width)
        self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, width=width)
        self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, width=width)

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.Mixed_7c.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # Shapes at 299 x 299, width 1.0 (at the 75 px minimum the four stages are 7, 3, 1, 1).
        x = self.Conv2d_1a_3x3(x)  # N x 32 x 149 x 149
        x = self.Conv2d_2a_3x3(x)  # N x 32 x 147 x 147
        x = self.Conv2d_2b_3x3(x)  # N x 64 x 147 x 147
        x = self.maxpool1(x)  # N x 64 x 73 x 73
        x = self.Conv2d_3b_1x1(x)  # N x 80 x 73 x 73
        x = self.Conv2d_4a_3x3(x)  # N x 192 x 71 x 71
        x = self.maxpool2(x)  # N x 192 x 35 x 35

        x = self.Mixed_5b(x)  # N x 256 x 35 x 35
        x = self.Mixed_5c(x)  # N x 288 x 35 x 35
        x = self.Mixed_5d(x)  # N x 288 x 35 x 35
        x = self.Mixed_6a(x)  # N x 768 x 17 x 17
        x = self.Mixed_6b(x)  # N x 768 x 17 x 17
        x = self.Mixed_6c(x)  # N x 768 x 17 x 17
        x = self.Mixed_6d(x)  # N x 768 x 17 x 17
        x = self.Mixed_6e(x)  # N x 768 x 17 x 17
        with_aux = self.training and self.AuxLogits is not None
        aux = self.AuxLogits(x) if with_aux else None  # N x num_classes
        x = self.Mixed_7a(x)  # N x 1280 x 8 x 8
        x = self.Mixed_7b(x)  # N x 2048 x 8 x 8
        x = self.Mixed_7c(x)  # N x 2048 x 8 x 8

        x = self.avgpool(x)  # N x 2048 x 1 x 1
        x = torch.flatten(self.dropout(x), 1)  # N x 2048
        x = self.fc(x)  # N x num_classes
        if with_aux:
            return x, aux
        return x


def inception_v3(
    num_classes: int = 1000, width: float = 1.0, aux_logits: bool = True, dropout: float = 0.5
) -> InceptionV3:
    """Inception-v3; aux_logits (on by default, as in torchvision) adds the 17 x 17 auxiliary head."""
    return InceptionV3(num_classes=num_classes, width=width, aux_logits=aux_logits, dropout=dropout)
