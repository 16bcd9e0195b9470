"""Residual blocks and shortcuts of He et al. 2015 (arXiv:1512.03385).

Module and attribute names follow torchvision's ResNet (`conv1`, `bn1`, ..., `downsample.0/1`) so that a
torchvision or timm state dict loads with strict=True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUTS = ("A", "B", "C")
VARIANTS = ("v1", "v1.5")


def conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option A (Sec. 3.3): identity with spatial sub-sampling and zero-padded extra channels; no parameters.

    The input's channels come first and the new channels are zeros, so the block still adds the identity
    of every existing channel (the paper: "the shortcut still performs identity mapping, with extra zero
    entries padded for increasing dimensions").
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.in_chs, self.out_chs, self.stride = in_chs, out_chs, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            # The same sub-sampling as x[:, :, ::s, ::s], as an average pool of size 1: its backward writes
            # the gradient in the input's memory format, where slicing's writes NCHW. In channels_last
            # training the mixed-layout addition and ReLU backward that followed ran 3-34x slower than in
            # one layout; ResNet-20 trained 3.5% faster this way (docs/results.md).
            x = F.avg_pool2d(x, 1, self.stride)
        extra = self.out_chs - self.in_chs
        return F.pad(x, (0, 0, 0, 0, 0, extra)) if extra else x

    def extra_repr(self) -> str:
        return f"{self.in_chs}->{self.out_chs}, stride={self.stride}"


def make_shortcut(shortcut: str, in_chs: int, out_chs: int, stride: int) -> nn.Module | None:
    """The `downsample` module of a block, or None for a plain identity.

    A: parameter-free padding where the shape changes. B: 1x1 conv + BN only where the shape changes.
    C: 1x1 conv + BN on every block (Table 3).
    """
    changes = stride != 1 or in_chs != out_chs
    if shortcut == "C" or (shortcut == "B" and changes):
        return nn.Sequential(conv1x1(in_chs, out_chs, stride), nn.BatchNorm2d(out_chs))
    if shortcut == "A" and changes:
        return PadShortcut(in_chs, out_chs, stride)
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR nets). BN after each conv; ReLU after the addition.

    With `residual=False` it is the paper's "plain" counterpart: the same stack with no shortcut at all.
    """

    expansion = 1

    def __init__(self, in_chs: int, width: int, stride: int = 1, shortcut: str = "B",
                 residual: bool = True, variant: str = "v1"):
        super().__init__()
        out_chs = width * self.expansion
        self.residual = residual
        self.conv1 = conv3x3(in_chs, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, out_chs)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(shortcut, in_chs, out_chs, stride) if residual else None

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 (reduce) -> 3x3 -> 1x1 (expand x4), for ResNet-50/101/152.

    `variant="v1"` puts a down-sampling block's stride on the first 1x1, as the paper and its released
    Caffe models do. `variant="v1.5"` puts it on the 3x3, as torchvision does (about 0.5% better top-1 and
    ~4.1 G instead of 3.8 G multiply-adds for ResNet-50; the change is described in NVIDIA's
    DeepLearningExamples "ResNet50 v1.5").
    """

    expansion = 4

    def __init__(self, in_chs: int, width: int, stride: int = 1, shortcut: str = "B",
                 residual: bool = True, variant: str = "v1"):
        super().__init__()
        out_chs = width * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if variant == "v1" else (1, stride)
        self.residual = residual
        self.conv1 = conv1x1(in_chs, width, stride_1x1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride_3x3)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_chs)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(shortcut, in_chs, out_chs, stride) if residual else None

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)
