"""Small backbones for sparse training and continual learning that train on 2 CPU cores in minutes.

Both follow the continual-DST study's conventions that make parameter isolation clean: no biases, and (ResNet)
BatchNorm with ``affine=False, track_running_stats=False``, i.e. batch statistics at test time too, so no state
outside the masked weights is shared between tasks. One output per class over all tasks (a single head); the
harness picks each task's slice.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import SparseTrainingError


def mlp(input_shape: tuple[int, ...], classes: int, hidden: tuple[int, ...] = (256, 256)) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 1
    for size in input_shape:
        width *= size
    for size in hidden:
        layers += [nn.Linear(width, size, bias=False), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, classes, bias=False))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out, affine=False, track_running_stats=False)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out, affine=False, track_running_stats=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels_out, affine=False, track_running_stats=False))

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.shortcut(x)).relu()


def resnet(input_shape: tuple[int, ...], classes: int, widths: tuple[int, ...] = (32, 64, 128)) -> nn.Module:
    """A CIFAR-style ResNet: one 3x3 stem, one basic block per stage (stride 2 after the first), global pooling."""
    channels = input_shape[0]
    layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False),
                               nn.BatchNorm2d(widths[0], affine=False, track_running_stats=False), nn.ReLU()]
    for index, width in enumerate(widths):
        layers.append(BasicBlock(widths[max(0, index - 1)], width, 1 if index == 0 else 2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], classes, bias=False)]
    return nn.Sequential(*layers)


BACKBONES: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "resnet": resnet}


def build_backbone(name: str, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    if name not in BACKBONES:
        raise SparseTrainingError(f"unknown backbone '{name}'; available: {', '.join(BACKBONES)}")
    return BACKBONES[name](input_shape, classes)
