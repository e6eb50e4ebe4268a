"""Two small MNIST classifiers built from the layers the pruner takes through their Conv2d views (pruning/
conv_views.py): trained networks with Conv1d and ConvTranspose2d layers for this machine (no trained audio CNN or
UNet here). As a user's own models they go through the command line as `--model FILE.py:NAME`.

- rows_mnist_cnn: a 1-D CNN reading the image as a sequence of 28 rows (each row's 28 pixels are the channels).
- hourglass_mnist_cnn: a UNet in small with a classifier head: two strided convs down, two ConvTranspose2d up (a
  2×2 stride-2 one, a 4×4 stride-2 padding-1 one: both kinds of view), each joined to the encoder's features of the
  same size, then pooled scores.
- denoiser_mnist, segmenter_mnist: the same UNet with a per-pixel head instead, models that are not classifiers
  (an image out; 11 class scores per pixel), trained, and their images written, by benchmarks/noisy_mnist_denoiser.py.

    cnn-sparsegpt train --model benchmarks/conv_views_cnn.py:rows_mnist_cnn --dataset mnist \\
        --data-dir ../shared/data --epochs 2 --out checkpoints/rows_mnist_cnn.pt
    cnn-sparsegpt train --model benchmarks/conv_views_cnn.py:hourglass_mnist_cnn --dataset mnist \\
        --data-dir ../shared/data --epochs 2 --out checkpoints/hourglass_mnist_cnn.pt
    cnn-sparsegpt bench --config configs/bench_conv_views_mnist_test.yaml --data-dir ../shared/data
    python benchmarks/target_speedup.py --model benchmarks/conv_views_cnn.py:hourglass_rgb_cnn --num-classes 10 \
        --image-size 128 --keep-macs 0.5 --json experiments/channels/hourglass_rgb_keep_macs.json
"""
from __future__ import annotations

import torch
from torch import nn


def _conv1d(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm1d(cout), nn.ReLU())


class RowsCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(_conv1d(28, 64, 5), _conv1d(64, 64, 5), nn.MaxPool1d(2), _conv1d(64, 128, 3),
                                      _conv1d(128, 128, 3))
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 28, 28): 28 rows of 28 pixels
        return self.fc(self.features(x.squeeze(1).transpose(1, 2)).mean(2))


def _conv2d(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class HourglassCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        w = width
        self.stem, self.down1, self.down2 = _conv2d(in_channels, w), _conv2d(w, 2 * w, 2), _conv2d(2 * w, 4 * w, 2)
        self.up1 = nn.Sequential(nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2, bias=False), nn.BatchNorm2d(2 * w),
                                 nn.ReLU())
        self.merge1 = _conv2d(4 * w, 2 * w)
        self.up2 = nn.Sequential(nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(w),
                                 nn.ReLU())
        self.merge2 = _conv2d(2 * w, w)
        self.fc = nn.Linear(w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        d1 = self.down1(s)
        y = self.merge1(torch.cat([self.up1(self.down2(d1)), d1], 1))
        return self.merge2(torch.cat([self.up2(y), s], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class HourglassDenoiser(HourglassCNN):
    """The same body with a per-pixel head: a noisy image in, the clean image out (image to image), or with
    `classes`, a score per class at each pixel (segmentation)."""

    def __init__(self, channels: int = 3, width: int = 32, classes: int | None = None):
        super().__init__(in_channels=channels, width=width)
        self.fc = nn.Conv2d(width, classes or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def rows_mnist_cnn(num_classes: int = 10) -> nn.Module:
    return RowsCNN(num_classes)


def hourglass_mnist_cnn(num_classes: int = 10) -> nn.Module:
    return HourglassCNN(num_classes)


def hourglass_rgb_cnn(num_classes: int = 10) -> nn.Module:
    """The same at twice the width on RGB images: for speed on random weights (benchmarks/target_speedup.py)."""
    return HourglassCNN(num_classes, in_channels=3, width=64)


def denoiser_mnist() -> nn.Module:
    """An image-to-image network: noisy MNIST digits (as RGB, the way image folders are read) to clean ones, trained
    by benchmarks/noisy_mnist_denoiser.py."""
    return HourglassDenoiser()


def segmenter_mnist() -> nn.Module:
    """A segmentation network: each pixel of an MNIST digit (as RGB) scored as background or its digit's class (11
    classes), trained by benchmarks/noisy_mnist_denoiser.py --task segment."""
    return HourglassDenoiser(classes=11)
