"""graphprune's small model zoo: architectures users can name as ``zoo:<name>``.

* ``cifar10_resnet20`` / ``cifar10_resnet56`` (also 32, 44, 110): He et al.'s CIFAR ResNets with
  option-A shortcuts (stride-2 subsampling and zero-padded channels, no parameters), laid out so
  that the akamaster pretrained state dicts load (``conv1``, ``bn1``, ``layer{1,2,3}.{i}``,
  ``linear``). Expect ImageNet mean/std normalisation of RGB in [0, 1].
* ``digits_resnet``: a small residual CNN for 8x8 grey images (scikit-learn's digits), used by
  ``graphprune demo``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .errors import GraphpruneError


class PadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::2, ::2]`` with ``pad`` zero channels on each side."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = PadShortcut(planes // 4) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: widths 16/32/64, n basic blocks per stage."""

    input_shape = (1, 3, 32, 32)

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise GraphpruneError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for stage, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class DigitsResNet(nn.Module):
    """A small residual CNN for 8x8 grey digits, upsampled to 16x16: 6 blocks in two stages."""

    input_shape = (1, 1, 16, 16)

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(*[BasicBlock(width, width) for _ in range(3)])
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), *[BasicBlock(2 * width, 2 * width) for _ in range(2)])
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        out = self.layer2(self.layer1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


_CIFAR_DEPTHS = {f"cifar10_resnet{d}": d for d in (20, 32, 44, 56, 110)}


def build(name: str) -> nn.Module:
    """A fresh (randomly initialised) zoo model."""
    if name in _CIFAR_DEPTHS:
        return CifarResNet(_CIFAR_DEPTHS[name])
    if name == "digits_resnet":
        return DigitsResNet()
    raise GraphpruneError(f"unknown zoo model '{name}'; available: {', '.join(available())}")


def available() -> list[str]:
    return [*_CIFAR_DEPTHS, "digits_resnet"]

