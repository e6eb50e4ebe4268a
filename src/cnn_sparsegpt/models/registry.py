"""A small model registry: one decorated factory per model, plus any torchvision or timm classifier by name."""
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


def timm_module():
    """timm, or a UserError that says how to install it (it is an optional extra)."""
    try:
        import timm
    except ImportError:
        raise UserError("timm models need the timm package: pip install 'cnn-sparsegpt[timm]' "
                        "(or pip install timm)") from None
    return timm


def check_model_name(name: str) -> None:
    """Raise a UserError naming the valid choices unless `name` can be built."""
    kind, _, arch = name.partition(":")
    if kind == "torchvision" and arch:
        import torchvision

        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise UserError(f"unknown torchvision model '{arch}'; see torchvision.models.list_models()")
    elif kind == "timm" and arch:
        if not timm_module().is_model(arch):
            raise UserError(f"unknown timm model '{arch}'; see timm.list_models()")
    elif name not in _REGISTRY:
        raise UserError(f"unknown model '{name}'; choose from {', '.join(list_models())}, torchvision:NAME "
                        "or timm:NAME")


def create_model(name: str, num_classes: int = 10) -> nn.Module:
    """A registry model, `torchvision:NAME` or `timm:NAME` (random weights; pretrained ones come from --weights)."""
    check_model_name(name)
    kind, _, arch = name.partition(":")
    if kind == "torchvision":
        import torchvision

        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if kind == "timm":
        return timm_module().create_model(arch, pretrained=False, num_classes=num_classes)
    return _REGISTRY[name].factory(num_classes=num_classes)


def head_classes(name: str, state: dict) -> int | None:
    """The number of classes of a checkpoint: the output size of the model's last Conv2d/Linear (its head),
    read from the state dict; None when the checkpoint has no such key."""
    probe = create_model(name, num_classes=7)  # a head of 7 tells the head's keys from the rest
    for n, m in probe.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == 7) or (isinstance(m, nn.Conv2d) and m.out_channels == 7):
            w = state.get(f"{n}.weight")
            if w is not None and w.ndim == m.weight.ndim:
                return int(w.shape[0])
    return None
