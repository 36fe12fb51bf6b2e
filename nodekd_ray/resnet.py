"""CIFAR ResNet teachers (He et al. 2016, section 4.2): three stages of 16/32/64 channels, 6n+2 layers, option-A
(zero-padded identity) shortcuts; parameter counts 0.27M, 0.46M, 0.66M, 0.85M, 1.7M. Every model takes pixels in
[0, 1]: the normalization (Normalize) is inside it, so attacks work in pixel space."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError

RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


class Normalize(nn.Module):
    """(x - mean) / std per channel, inside the model so attacks work in [0, 1] pixel space."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def _he_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in",
                                    nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.pad = c_out - c_in  # option A: subsample by 2 and zero-pad the new channels
        self.stride = stride

    def shortcut(self, x):
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, mean=(0.5,) * 3, std=(0.25,) * 3, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ConfigError("model", f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.normalize = Normalize(mean, std)
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, c_in = [], 16
        for stage, c_out in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if (stage > 0 and i == 0) else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        _he_init(self)

    def forward(self, x):  # x: (B, C, 32, 32) in [0, 1]
        h = F.relu(self.bn(self.conv(self.normalize(x))))
        h = self.blocks(h)  # (B, 64, 8, 8)
        return self.fc(h.mean(dim=(2, 3)))  # (B, classes)
