"""Models as ``nn.Sequential`` of blocks (stem, residual blocks, head), so they can be cut into stages."""

from __future__ import annotations

from typing import List, Sequence

from torch import nn

__all__ = ["BasicBlock", "Bottleneck", "resnet", "resnet_small", "resnet18", "resnet50", "mlp", "image_mlp",
           "MLP_SIZES"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out = channels * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out))
        self.shortcut = _shortcut(in_channels, out, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (ResNet-50+)."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out = channels * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, stride, 1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, out, 1, bias=False), nn.BatchNorm2d(out))
        self.shortcut = _shortcut(in_channels, out, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                         nn.BatchNorm2d(out_channels))


def resnet(blocks: Sequence[int] = (1, 1, 1), widths: Sequence[int] = (16, 32, 64), *,
           in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
           bottleneck: bool = False) -> nn.Sequential:
    """A ResNet as a flat ``nn.Sequential``: stem, one entry per residual block, head.

    Args:
        blocks: residual blocks per stage; each stage after the first halves the resolution.
        widths: channels per stage (times 4 at the output of bottleneck blocks).
        in_channels, num_classes: input channels and number of classes.
        image_size: images below 64 pixels get a 3x3 stride-1 stem (CIFAR style);
            larger ones the ImageNet 7x7 stride-2 stem with max pooling.
        bottleneck: Bottleneck blocks (ResNet-50 style) instead of BasicBlocks.
    """
    if len(blocks) != len(widths) or not blocks or min(blocks) < 1 or min(widths) < 1:
        raise ValueError(f"blocks {tuple(blocks)} and widths {tuple(widths)} must be equally long lists of "
                         f"positive integers")
    block = Bottleneck if bottleneck else BasicBlock
    if image_size < 64:
        stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                             nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
    else:
        stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False),
                             nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
    layers: List[nn.Module] = [stem]
    channels = widths[0]
    for stage, (count, width) in enumerate(zip(blocks, widths)):
        for i in range(count):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(block(channels, width, stride))
            channels = width * block.expansion
    layers.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)))
    return nn.Sequential(*layers)


def resnet_small(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """An 8-layer CIFAR-style ResNet (widths 16-32-64, one block per stage) for CPUs."""
    return resnet((1, 1, 1), (16, 32, 64), in_channels=in_channels, num_classes=num_classes,
                  image_size=image_size)


def resnet18(in_channels: int = 3, num_classes: int = 1000, image_size: int = 224) -> nn.Sequential:
    return resnet((2, 2, 2, 2), (64, 128, 256, 512), in_channels=in_channels, num_classes=num_classes,
                  image_size=image_size)


def resnet50(in_channels: int = 3, num_classes: int = 1000, image_size: int = 224) -> nn.Sequential:
    return resnet((3, 4, 6, 3), (64, 128, 256, 512), in_channels=in_channels, num_classes=num_classes,
                  image_size=image_size, bottleneck=True)


def mlp(sizes: Sequence[int], *, flatten: bool = True) -> nn.Sequential:
    """Fully connected layers ``sizes[0] -> ... -> sizes[-1]`` with ReLU between them.

    The Sequential holds one entry per layer (``Linear`` followed by ``ReLU`` in a
    sub-Sequential, the last one bare), plus a leading ``Flatten`` when ``flatten``.
    """
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"mlp needs at least two positive sizes, got {tuple(sizes)}")
    layers: List[nn.Module] = [nn.Flatten()] if flatten else []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        layers.append(nn.Linear(n_in, n_out) if last else nn.Sequential(nn.Linear(n_in, n_out), nn.ReLU()))
    return nn.Sequential(*layers)


MLP_SIZES = (256, 128, 100)
"""The hidden sizes of the jobs' MLP (jobs/mlp_mp.py, jobs/mlp_tp.py)."""


def image_mlp(in_channels: int, num_classes: int, image_size: int, hidden=MLP_SIZES) -> nn.Sequential:
    """:func:`mlp` for flattened ``in_channels x image_size x image_size`` images."""
    return mlp([in_channels * image_size * image_size, *hidden, num_classes])
