"""ResNet-18-style nets with BatchNorm (He et al., 2016), sized for MNIST and CIFAR-10."""

from __future__ import annotations

import torch
from torch import nn

from randprop.models.registry import register_model


class BasicBlock(nn.Module):
    """y = relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), 3x3 convs; the shortcut is the
    identity, or a strided 1x1 conv with BatchNorm where the shape changes."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """3x3 stem conv, four stages of two BasicBlocks (width w, 2w, 4w, 8w; stages 2-4 halve
    the resolution), global average pooling and a linear classifier."""

    def __init__(self, in_channels: int, width: int, classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        channels = width
        for stage in range(4):
            out = width * 2**stage
            blocks += [BasicBlock(channels, out, 1 if stage == 0 else 2), BasicBlock(out, out)]
            channels = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))


@register_model("resnet18", (1, 28, 28), "ResNet-18-style net, BatchNorm, widths 16-128 (MNIST)")
def resnet18(in_channels: int = 1, width: int = 16, classes: int = 10) -> nn.Module:
    """ResNet-18 layout (stem + 4 stages x 2 BasicBlocks) at base width ``width``."""
    return ResNet(in_channels, width, classes)


@register_model(
    "resnet18-cifar", (3, 32, 32), "ResNet-18-style net, BatchNorm, widths 16-128 (CIFAR-10)"
)
def resnet18_cifar(in_channels: int = 3, width: int = 16, classes: int = 10) -> nn.Module:
    """:func:`resnet18` for 3x32x32 input."""
    return ResNet(in_channels, width, classes)
