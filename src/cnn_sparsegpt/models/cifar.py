"""ResNet-18 and VGG-16 adapted to 32x32 CIFAR inputs, keeping torchvision's parameter names."""
import torchvision
from torch import nn

from .registry import register_model


@register_model(dataset="cifar10")
def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # 3x3 stem, no max-pool: 32x32 inputs stay 32x32
    model.maxpool = nn.Identity()
    return model


@register_model(dataset="cifar10")
def vgg16_cifar(num_classes: int = 10) -> nn.Module:
    model = torchvision.models.vgg16_bn(weights=None)
    model.avgpool = nn.AdaptiveAvgPool2d(1)  # the features end at 1x1 for 32x32 inputs
    model.classifier = nn.Sequential(
        nn.Linear(512, 4096), nn.ReLU(inplace=True), nn.Dropout(),
        nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(),
        nn.Linear(4096, num_classes),
    )
    return model
