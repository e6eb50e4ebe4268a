"""A small model registry: one decorated factory per model, plus any torchvision classifier by name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..utils import UserError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]  # factory(num_classes=...) -> nn.Module
    dataset: str  # the dataset it is built for; its input shape follows from it


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(dataset: str) -> Callable:
    """Decorator: `@register_model(dataset="cifar10")` over `def my_net(num_classes=10) -> nn.Module`."""
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[fn.__name__] = ModelEntry(fn.__name__, fn, dataset)
        return fn
    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry | None:
    return _REGISTRY.get(name)


def check_model_name(name: str) -> None:
    """Raise a UserError naming the valid choices unless `name` can be built."""
    if name.startswith("torchvision:"):
        import torchvision

        if name.split(":", 1)[1] not in torchvision.models.list_models(module=torchvision.models):
            raise UserError(f"unknown torchvision model '{name.split(':', 1)[1]}'; "
                            "see torchvision.models.list_models()")
    elif name not in _REGISTRY:
        raise UserError(f"unknown model '{name}'; choose from {', '.join(list_models())} or torchvision:NAME")


def create_model(name: str, num_classes: int = 10) -> nn.Module:
    """A registry model, or `torchvision:NAME` for any torchvision classification model."""
    check_model_name(name)
    if name.startswith("torchvision:"):
        import torchvision

        return torchvision.models.get_model(name.split(":", 1)[1], weights=None, num_classes=num_classes)
    return _REGISTRY[name].factory(num_classes=num_classes)
