"""Backbones for FCN: each returns features at strides 8, 16 and 32 (the paper's pool3,
pool4 and pool5 levels) and says how many channels each has.

* ``compact``: a small residual network sized to train from scratch on a CPU.
* ``resnet18/34/50``: torchvision ResNets, randomly initialised (no weights are downloaded).

``norm`` picks the normalisation of the early layers (Pan et al., "Two at Once: Enhancing Learning
and Generalization Capacities via IBN-Net", ECCV 2018).  Instance normalisation there removes
per-image contrast and colour statistics, which change with the camera, the light and the time of day:

* ``bn``: BatchNorm everywhere (the default, and every checkpoint saved before ``norm`` existed);
* ``ibn_a``: the first conv of each block in the stride-4/8/16 stages normalises half its
  channels per instance (IN) and half over the batch (BN);
* ``ibn_b``: the stem's first conv is followed by IN instead of BN, and the last block of the
  stride-4 and stride-8 stages adds IN after its residual sum.  The network's output is then
  (up to IN's epsilon) unchanged when an image's normalised input is multiplied by a positive
  factor, i.e. its contrast about mid-grey scaled (before any pixel clips at black or white).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from genseg.config import SEG_NORMS


class InstanceNorm(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` (affine) that keeps a channels-last input channels-last, and gives a
    1x1 map (a small image deep in the net) its bias, the limit of normalising one value, where
    PyTorch's raises."""

    def __init__(self, channels: int):
        super().__init__(channels, affine=True)

    def forward(self, x):
        if x.shape[-1] * x.shape[-2] == 1:      # input and weight times 0: zero gradients, not none (DDP)
            return (x * 0) * self.weight.view(1, -1, 1, 1).to(x.dtype) + self.bias.view(1, -1, 1, 1).to(x.dtype)
        return _like(x, super().forward(x))


def _like(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` in ``x``'s memory format: channels-last when ``x`` is (norms and ``cat`` return NCHW)."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y


class IBN(nn.Module):
    """IBN-a's split normalisation: the first ``channels // 2`` channels by InstanceNorm (with
    affine parameters), the rest by BatchNorm."""

    def __init__(self, channels: int):
        super().__init__()
        self.half = channels // 2
        self.IN = InstanceNorm(self.half)
        self.BN = nn.BatchNorm2d(channels - self.half)

    def forward(self, x):
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return _like(x, torch.cat([self.IN(a), self.BN(b)], dim=1))


def _norm(kind: str, channels: int) -> nn.Module:
    return {"bn": lambda: nn.BatchNorm2d(channels), "in": lambda: InstanceNorm(channels),
            "ibn": lambda: IBN(channels)}[kind]()


def _conv_bn(cin: int, cout: int, stride: int = 1, norm: str = "bn") -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _norm(norm, cout),
                         nn.ReLU(inplace=True))


class _Block(nn.Module):
    """ResNet basic block: two 3x3 convs and an identity (or 1x1 projection) shortcut.  ``ibn``:
    IBN-a's split norm after the first conv; ``in_after``: IBN-b's InstanceNorm after the sum."""

    def __init__(self, cin: int, cout: int, stride: int = 1, ibn: bool = False, in_after: bool = False):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, stride, "ibn" if ibn else "bn")
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        nn.init.zeros_(self.conv2[1].weight)   # start each block as identity: trains from scratch
        self.IN = InstanceNorm(cout) if in_after else None
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.conv2(self.conv1(x)) + self.short(x)
        return self.act(out if self.IN is None else self.IN(out))


def _stage(cin: int, cout: int, blocks: int, stride: int, norm: str = "bn", early: bool = False) -> nn.Sequential:
    """``early``: a stage whose blocks IBN changes (stride 4 and 8 for ibn_b, also 16 for ibn_a)."""
    ibn = early and norm == "ibn_a"
    in_last = early and norm == "ibn_b"
    return nn.Sequential(*[_Block(cin if i == 0 else cout, cout, stride if i == 0 else 1, ibn=ibn,
                                  in_after=in_last and i == blocks - 1) for i in range(blocks)])


class CompactBackbone(nn.Module):
    """Widths w, 2w, 4w, 8w at strides 4, 8, 16, 32 (w=32: ~2.8M parameters)."""

    def __init__(self, width: int = 32, blocks: tuple[int, int, int, int] = (1, 2, 2, 2), norm: str = "bn"):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv_bn(3, w // 2, 2, "in" if norm == "ibn_b" else "bn"), _conv_bn(w // 2, w, 2))
        self.layer1 = _stage(w, w, blocks[0], 1, norm, early=True)
        self.layer2 = _stage(w, 2 * w, blocks[1], 2, norm, early=True)
        self.layer3 = _stage(2 * w, 4 * w, blocks[2], 2, norm, early=norm == "ibn_a")
        self.layer4 = _stage(4 * w, 8 * w, blocks[3], 2)
        self.channels = (2 * w, 4 * w, 8 * w)

    def forward(self, x):
        x = self.layer1(self.stem(x))
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        return c3, c4, self.layer4(c4)


def _add_in_after_sum(block: nn.Module) -> None:
    """IBN-b's InstanceNorm between a torchvision ResNet block's residual sum and its ReLU, as an
    ``IN`` attribute of the block (so its parameters end in ``.IN.weight``, as in IBN-Net's own)."""
    from genseg.models._ibn_resnet import WITH_IN

    block.IN = InstanceNorm((block.bn3 if hasattr(block, "bn3") else block.bn2).num_features)
    block.__class__ = WITH_IN[type(block)]


class ResNetBackbone(nn.Module):
    def __init__(self, name: str, norm: str = "bn"):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        if norm == "ibn_a":                      # layer1-3: half of each block's first norm by IN
            for layer in (net.layer1, net.layer2, net.layer3):
                for block in layer:
                    block.bn1 = IBN(block.bn1.num_features)
        elif norm == "ibn_b":                    # the stem's norm, and IN after the last sum of layer1-2
            net.bn1 = InstanceNorm(net.bn1.num_features)
            for layer in (net.layer1, net.layer2):
                _add_in_after_sum(layer[-1])
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layer2, self.layer3, self.layer4 = net.layer2, net.layer3, net.layer4
        expansion = 4 if name == "resnet50" else 1
        self.channels = (128 * expansion, 256 * expansion, 512 * expansion)

    def forward(self, x):
        c3 = self.layer2(self.stem(x))
        c4 = self.layer3(c3)
        return c3, c4, self.layer4(c4)


BACKBONES: dict[str, Callable[[int, str], nn.Module]] = {
    "compact": lambda width, norm: CompactBackbone(width, norm=norm),
    "resnet18": lambda width, norm: ResNetBackbone("resnet18", norm),
    "resnet34": lambda width, norm: ResNetBackbone("resnet34", norm),
    "resnet50": lambda width, norm: ResNetBackbone("resnet50", norm),
}


def build_backbone(name: str, width: int = 32, norm: str = "bn") -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if norm not in SEG_NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(SEG_NORMS)}")
    return BACKBONES[name](width, norm)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
