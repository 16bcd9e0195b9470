"""The two families of the paper as one general network: a stem, stages of blocks, pool, fc.

ImageNet family (Table 1): 7x7/2 conv 64 -> 3x3/2 max-pool -> 4 stages (64, 128, 256, 512 wide).
CIFAR family (Sec. 4.2): 3x3 conv 16 -> 3 stages of n blocks (16, 32, 64 wide), 6n+2 layers.
Both: global average pool -> fc; stride 2 at the start of every stage after the first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BasicBlock, Bottleneck

BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}
STEMS = ("imagenet", "cifar")


class ResNet(nn.Module):
    """A residual (or plain) network. Named models are built by `resnet.create_model`.

    Interface for backbone use: `forward_features` (last feature map), `forward_head` (pool + fc),
    `forward_stages` (the stem's and every stage's feature map, described by `feature_info`).
    """

    def __init__(
        self,
        block: str,
        layers: tuple[int, ...],
        widths: tuple[int, ...],
        stem: str = "imagenet",
        num_classes: int = 1000,
        in_chans: int = 3,
        shortcut: str = "B",
        variant: str = "v1",
        residual: bool = True,
        zero_init_residual: bool = False,
        init_weights: bool = True,
    ):
        super().__init__()
        if block not in BLOCKS or stem not in STEMS or len(layers) not in (3, 4) or len(widths) != len(layers):
            raise ValueError(f"ResNet takes block in {tuple(BLOCKS)}, stem in {STEMS} and 3 or 4 stages "
                             f"(layers and widths of equal length), not block={block!r}, stem={stem!r}, "
                             f"layers={layers}, widths={widths}.")
        block_cls = BLOCKS[block]
        self.num_classes = num_classes
        stem_chs = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            stem_reduction, reduction = 2, 4
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
            stem_reduction, reduction = 1, 1
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.relu = nn.ReLU(inplace=True)
        self.feature_info = [{"module": "relu", "num_chs": stem_chs, "reduction": stem_reduction}]

        in_chs = stem_chs
        self.stage_names = [f"layer{i + 1}" for i in range(len(layers))]
        for i, (repeats, width) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(repeats):
                blocks.append(block_cls(in_chs, width, stride if j == 0 else 1, shortcut=shortcut,
                                        residual=residual, variant=variant))
                in_chs = width * block_cls.expansion
            name = self.stage_names[i]
            self.add_module(name, nn.Sequential(*blocks))
            self.feature_info.append({"module": name, "num_chs": in_chs, "reduction": reduction})
        self.num_features = in_chs
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chs, num_classes)
        if init_weights:  # skipped only where the values are never used (complexity counting)
            self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # He et al. 2015 ("Delving deep into rectifiers"), which the paper cites: normal, std sqrt(2 / n); that
        # paper allows n = fan_in or fan_out, we use fan_out (as torchvision).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Departure from the paper (Goyal et al. 2017, "Accurate, Large Minibatch SGD"): each residual
            # branch starts as zero, so every block starts as the identity.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, n) for n in self.stage_names]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of the stem (before max-pool) and of every stage, as listed in `feature_info`."""
        x = self.forward_stem(x)
        feats = [x]
        x = self.maxpool(x)
        for stage in self.stages():
            x = stage(x)
            feats.append(x)
        return feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # The stages by name, not through stages(), so that torch.jit.script compiles this method.
        x = self.layer3(self.layer2(self.layer1(self.maxpool(self.forward_stem(x)))))
        if hasattr(self, "layer4"):
            x = self.layer4(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.training:
            # Global average pooling as a pool of the map's own size: the same mean, but its backward keeps
            # the input's memory format (the mean's writes NCHW; see PadShortcut). In evaluation and export
            # the adaptive pool stays, so an exported graph takes any input size.
            x = torch.flatten(F.avg_pool2d(x, x.shape[-2:]), 1)
        else:
            x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
