"""A small ResNeXt-style CNN for MNIST (two bottleneck blocks whose 3x3 convs run in 8 groups): a trained network
with grouped convs for `--structure channels` on this machine (no trained ResNeXt or RegNet, no ImageNet here).

    cnn-sparsegpt train --model benchmarks/grouped_cnn.py:grouped_mnist_cnn --dataset mnist \\
        --data-dir ../shared/data --epochs 2 --out checkpoints/grouped_mnist_cnn.pt
    cnn-sparsegpt bench --config configs/bench_grouped_mnist_test.yaml --data-dir ../shared/data
"""
from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, channels: int, width: int, groups: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, channels, 1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(x + self.bn3(self.conv3(y)))


class GroupedMnistCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.block1 = Bottleneck(32, 64, 8)
        self.pool = nn.MaxPool2d(2)
        self.block2 = Bottleneck(32, 64, 8)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.pool(self.block1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def grouped_mnist_cnn(num_classes: int = 10) -> nn.Module:
    return GroupedMnistCNN(num_classes)
