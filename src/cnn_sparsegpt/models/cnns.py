"""The two small CNNs of the original study (MNIST and CIFAR-10)."""
from torch import nn

from .registry import register_model


@register_model(dataset="mnist")
def mnist_cnn(num_classes: int = 10) -> nn.Module:
    # The 12544-wide Linear is the largest Hessian among the built-in models: a good solver stress test.
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64 * 14 * 14, 128), nn.ReLU(inplace=True), nn.Dropout(0.25),
        nn.Linear(128, num_classes),
    )


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register_model(dataset="cifar10")
def cifar_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        *_conv_bn(3, 64), *_conv_bn(64, 64), nn.MaxPool2d(2), nn.Dropout(0.3),
        *_conv_bn(64, 128), *_conv_bn(128, 128), nn.MaxPool2d(2), nn.Dropout(0.4),
        nn.Flatten(), nn.Linear(128 * 8 * 8, 256), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(256, num_classes),
    )
