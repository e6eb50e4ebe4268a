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


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, c: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.shortcut = nn.Sequential()  # identity; a 1x1 projection where the shape changes
        if stride != 1 or cin != c:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = nn.functional.relu(self.bn1(self.conv1(x)))
        return nn.functional.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet20(nn.Module):
    """The compact CIFAR ResNet-20 (He et al. 2016), with 1x1 projection shortcuts (the layout of
    ../shared/checkpoints/resnet20_cifar10.pt)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for c, stride in ((16, 1), (32, 2), (64, 2)):
            stages.append(nn.Sequential(*[_BasicBlock(cin if i == 0 else c, c, stride if i == 0 else 1)
                                          for i in range(3)]))
            cin = c
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = nn.functional.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


@register_model(dataset="cifar10")
def resnet20_cifar(num_classes: int = 10) -> nn.Module:
    return ResNet20(num_classes)
