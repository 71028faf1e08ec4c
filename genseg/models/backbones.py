"""Backbones for FCN: each returns features at strides 8, 16 and 32 (the paper's pool3,
pool4 and pool5 levels) and says how many channels each has.

* ``compact``: a small residual network sized to train from scratch on a CPU.
* ``resnet18/34/50``: torchvision ResNets, randomly initialised (no weights are downloaded).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class _Block(nn.Module):
    """ResNet basic block: two 3x3 convs and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        nn.init.zeros_(self.conv2[1].weight)   # start each block as identity: trains from scratch
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.conv2(self.conv1(x)) + self.short(x))


def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(_Block(cin, cout, stride), *[_Block(cout, cout) for _ in range(blocks - 1)])


class CompactBackbone(nn.Module):
    """Widths w, 2w, 4w, 8w at strides 4, 8, 16, 32 (w=32: ~2.8M parameters)."""

    def __init__(self, width: int = 32, blocks: tuple[int, int, int, int] = (1, 2, 2, 2)):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv_bn(3, w // 2, 2), _conv_bn(w // 2, w, 2))
        self.layer1 = _stage(w, w, blocks[0], 1)
        self.layer2 = _stage(w, 2 * w, blocks[1], 2)
        self.layer3 = _stage(2 * w, 4 * w, blocks[2], 2)
        self.layer4 = _stage(4 * w, 8 * w, blocks[3], 2)
        self.channels = (2 * w, 4 * w, 8 * w)

    def forward(self, x):
        x = self.layer1(self.stem(x))
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        return c3, c4, self.layer4(c4)


class ResNetBackbone(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layer2, self.layer3, self.layer4 = net.layer2, net.layer3, net.layer4
        expansion = 4 if name == "resnet50" else 1
        self.channels = (128 * expansion, 256 * expansion, 512 * expansion)

    def forward(self, x):
        c3 = self.layer2(self.stem(x))
        c4 = self.layer3(c3)
        return c3, c4, self.layer4(c4)


BACKBONES: dict[str, Callable[[int], nn.Module]] = {
    "compact": lambda width: CompactBackbone(width),
    "resnet18": lambda width: ResNetBackbone("resnet18"),
    "resnet34": lambda width: ResNetBackbone("resnet34"),
    "resnet50": lambda width: ResNetBackbone("resnet50"),
}


def build_backbone(name: str, width: int = 32) -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name](width)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
