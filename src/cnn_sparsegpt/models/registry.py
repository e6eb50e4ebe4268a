"""A small model registry: one decorated factory per model, plus any torchvision or timm classifier by name, a
Hugging Face image classifier as `hf:NAME` (a Hub name or a local folder with its config.json), and a user's own
model as `FILE.py:NAME` or `package.module:NAME` (NAME a function or nn.Module class that builds it)."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
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
    """The registry's entry for `name`; a user's `FILE.py:NAME` has one where its file registers NAME."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    factory = user_factory(name)
    entry = _REGISTRY.get(getattr(factory, "__name__", ""))
    return entry if entry is not None and entry.factory is factory else None


def _is_user_name(name: str) -> bool:
    source, sep, _ = name.rpartition(":")
    return bool(sep) and source not in LIBRARIES


def _import_user_module(source: str):
    """The module of `FILE.py` (imported from its path, once per process) or of an importable `package.module`."""
    if source.endswith(".py") or "/" in source or "\\" in source:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"model file not found: {path} (--model FILE.py:NAME)")
        # registered in sys.modules under a name of its own, as importlib's recipe does, so that dataclasses
        # and pickling inside the file work; the same file is never executed twice
        key = "cnn_sparsegpt_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        if key in sys.modules:
            return sys.modules[key]
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except SystemExit as e:  # a training script that parses its arguments on import
            del sys.modules[key]
            raise UserError(f"importing {path} exited (SystemExit {e.code}): a script's code runs on import; put it "
                            "under `if __name__ == '__main__':`") from None
        except Exception as e:
            del sys.modules[key]
            raise UserError(f"importing {path} failed: {type(e).__name__}: {e}") from None
        return module
    try:
        return importlib.import_module(source)
    except Exception as e:
        raise UserError(f"cannot import '{source}' ({type(e).__name__}: {e}); give an installed module, or the "
                        "file's path as --model FILE.py:NAME") from None


def user_factory(name: str) -> Callable[..., nn.Module] | None:
    """The callable a user's `FILE.py:NAME` or `package.module:NAME` names; None for the other kinds of name."""
    if not _is_user_name(name):
        return None
    source, _, attr = name.rpartition(":")
    module = _import_user_module(source)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"{source} has no function or class '{attr}' that builds the model (--model {name})")
    return factory


def _build_user_model(name: str, num_classes: int | None, kwargs: dict) -> nn.Module:
    """Call the factory with `kwargs` and num_classes where it takes it (or **kwargs) and one is given; its own
    default otherwise."""
    factory = user_factory(name)
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        params = ()
    takes = any(p.name == "num_classes" or p.kind is p.VAR_KEYWORD for p in params)
    heads = {"num_classes": num_classes} if takes and num_classes is not None else {}
    try:
        model = factory(**heads | kwargs)
    except Exception as e:
        raise UserError(f"building the model {name} failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{name} returned {type(model).__name__}, not a torch nn.Module")
    return model


LIBRARIES = ("torchvision", "timm", "hf")  # model names LIBRARY:NAME that are not a user's FILE.py:NAME


def hf_module():
    """transformers, or a UserError that says how to install it (an optional extra)."""
    try:
        import transformers
    except ImportError:
        raise UserError("hf: models need the transformers package: pip install 'cnn-sparsegpt[hf]' (or pip install "
                        "transformers)") from None
    return transformers


def hf_config(name: str, **overrides):
    """The config of Hugging Face model `name` (a Hub name, fetched once into its cache, or a local folder), with
    `overrides` of its fields (num_labels, --model-kwargs)."""
    transformers = hf_module()
    try:
        return transformers.AutoConfig.from_pretrained(name, **overrides)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"hf:{name}: no model config ({first}): a Hub name (e.g. microsoft/resnet-50) needs the "
                        "network once, then it is cached; or give a local folder that holds config.json") from None


def _hf_model(name: str, num_classes: int | None, kwargs: dict) -> nn.Module:
    """An image classifier of transformers built from its config (random weights: pretrained ones come from
    --weights pretrained, the Hub's model.safetensors)."""
    labels = {} if num_classes is None else {"id2label": {i: f"LABEL_{i}" for i in range(num_classes)}}
    config = hf_config(name, **labels, **kwargs)  # (num_labels follows; a new head's labels named as transformers does)
    try:
        return hf_module().AutoModelForImageClassification.from_config(config)
    except ValueError:
        raise UserError(f"hf:{name} is a '{config.model_type}' model: not an image classifier transformers builds "
                        "(AutoModelForImageClassification); give such a model, or your own builder as FILE.py:NAME"
                        ) from None


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

        if arch not in torchvision.models.list_models(module=torchvision.models) and not is_video_model(name):
            other = next((f"a {kind} model" for kind in ("detection", "optical_flow")
                          if arch in torchvision.models.list_models(module=getattr(torchvision.models, kind))), None)
            if other:  # their inputs are lists of images or image pairs, not one batch
                raise UserError(f"torchvision:{arch} is {other}: the command line prunes models that take a batch of "
                                "images (classifiers, segmentation) or of clips (video classifiers); prune its "
                                "backbone from Python with cnn_sparsegpt.prune_model(model.backbone, images, ...)")
            if arch not in _segmentation_models():
                raise UserError(f"unknown torchvision model '{arch}'; see torchvision.models.list_models()")
    elif kind == "timm" and arch:
        if not timm_module().is_model(arch):
            raise UserError(f"unknown timm model '{arch}'; see timm.list_models()")
    elif kind == "hf" and arch:
        hf_config(arch)
    elif _is_user_name(name):
        user_factory(name)
    elif name not in _REGISTRY:
        raise UserError(f"unknown model '{name}'; choose from {', '.join(list_models())}, torchvision:NAME, "
                        "timm:NAME, hf:NAME, or your own as FILE.py:NAME")


def is_video_model(name: str) -> bool:
    """A torchvision video classifier: it takes a batch of clips (N, 3, T, H, W), given as a tensor file."""
    kind, _, arch = name.partition(":")
    if kind != "torchvision":
        return False
    import torchvision

    return arch in torchvision.models.list_models(module=torchvision.models.video)


def _segmentation_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models.segmentation)


def create_model(name: str, num_classes: int | None = 10, state: dict | None = None,
                 kwargs: dict | None = None) -> nn.Module:
    """A registry model, `torchvision:NAME`, `timm:NAME`, `hf:NAME` or a user's `FILE.py:NAME` (random weights;
    pretrained ones come from --weights). num_classes None: the builder's own default. state: the checkpoint it will
    load, where its keys tell the architecture (a torchvision segmentation model's auxiliary head). kwargs: more
    keyword arguments for the builder (--model-kwargs: a width, a depth, a dropout rate; an hf: model's config
    fields)."""
    check_model_name(name)
    kwargs = dict(kwargs or {})
    if _is_user_name(name):
        return _build_user_model(name, num_classes, kwargs)
    heads = ({} if num_classes is None else {"num_classes": num_classes}) | kwargs
    kind, _, arch = name.partition(":")
    try:
        if kind == "torchvision":
            import torchvision

            if arch in _segmentation_models():  # no backbone download; the aux head where the checkpoint has one
                heads = {"weights_backbone": None,
                         "aux_loss": any(k.startswith("aux_classifier.") for k in state or {})} | heads
            return torchvision.models.get_model(arch, weights=None, **heads)
        if kind == "timm":
            return timm_module().create_model(arch, pretrained=False, **heads)
        if kind == "hf":
            return _hf_model(arch, num_classes, kwargs)
        return _REGISTRY[name].factory(**heads)
    except TypeError as e:  # a keyword the builder does not take
        if not kwargs:
            raise
        raise UserError(f"building the model {name} with --model-kwargs {format_kwargs(kwargs)} failed: {e}") from None


def format_kwargs(kwargs: dict) -> str:
    """Keyword arguments as --model-kwargs takes them: KEY=VALUE ... (values as Python literals)."""
    return " ".join(f"{k}={v!r}" for k, v in kwargs.items())


def head_classes(name: str, state: dict, probe: nn.Module | None = None,
                 kwargs: dict | None = None) -> int | None:
    """The number of classes of a checkpoint: the output size of the model's last Conv2d/Linear (its head),
    read from the state dict; None when the checkpoint has no such key. probe: the model built with a head of 7,
    where the caller has it already."""
    if probe is None:  # a head of 7 tells the head's keys from the rest
        probe = create_model(name, num_classes=7, state=state, kwargs=kwargs)
    for n, m in probe.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == 7) or (isinstance(m, nn.Conv2d) and m.out_channels == 7):
            w = state.get(f"{n}.weight")
            if w is not None and w.ndim == m.weight.ndim:
                return int(w.shape[0])
    return None
