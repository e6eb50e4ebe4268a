"""Preprocessing that matches the model: resize, center crop and normalization, resolved once per run.

`imagenet` is what torchvision's `weights.transforms()` does for its classification weights (shorter
side to 256, bilinear with antialiasing, center crop 224, ImageNet mean/std), bit for bit. `auto` takes
the numbers from the checkpoint's .json, then from the model (torchvision weight metadata, timm's
`pretrained_cfg`), then from the dataset's convention. A pretrained model is never normalized with
statistics recomputed from the data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..utils import UserError

PRESETS = ("auto", "imagenet", "cifar", "none")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASET_NORMALIZATION = {  # per-channel mean and std of the training images
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


TENSOR_FILES = (".pt", ".pth", ".safetensors")  # --dataset FILE: model inputs stored as tensors (datasets.TensorSet)


def is_tensor_file(dataset: str | Path) -> bool:
    """Whether --dataset names a tensor file of model inputs (served as they are) rather than images."""
    return str(dataset).endswith(TENSOR_FILES)


@dataclass(frozen=True)
class Preprocess:
    mean: tuple = IMAGENET_MEAN  # per channel, of pixels in [0, 1]
    std: tuple = IMAGENET_STD
    resize: int | None = None  # shorter side in pixels before the crop; None = images kept at their size
    crop: int | None = None  # center crop (square), pixels; None = no crop
    interpolation: str = "bilinear"  # of the resize (antialiased, as torchvision's presets)
    source: str = ""  # where these numbers came from, for reports

    @property
    def crop_pct(self) -> float | None:
        return self.crop / self.resize if self.crop and self.resize else None

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    def geometry(self, img):
        """PIL image -> uint8 tensor (C, H, W): the resize and crop, nothing else (normalization is done on
        whole batches by `normalize`, with the same float operations as torchvision's)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        if self.resize:
            img = TF.resize(img, [self.resize], interpolation=InterpolationMode(self.interpolation), antialias=True)
        if self.crop:
            img = TF.center_crop(img, [self.crop])
        return TF.pil_to_tensor(img)

    def train_geometry(self, img):
        """PIL image -> uint8 tensor (C, crop, crop) for training: a random crop of 8-100% of the area and
        aspect 3/4-4/3, resized to the crop size, flipped half the time (the ImageNet recipe of torchvision's
        references). Draws from torch's generator (seeded per DataLoader worker)."""
        from torchvision import transforms as T

        interp = T.InterpolationMode(self.interpolation)
        img = T.RandomResizedCrop(self.crop, interpolation=interp, antialias=True)(img)
        return T.functional.pil_to_tensor(T.RandomHorizontalFlip()(img))


def normalize(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32, as torchvision's convert_image_dtype then normalize (bit for bit)."""
    c = x.shape[1]
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
    return (x.to(torch.float32) / 255).sub_(m).div_(s)


def imagenet(resize: int = 256, crop: int = 224, interpolation: str = "bilinear",
             source: str = "imagenet") -> Preprocess:
    return Preprocess(IMAGENET_MEAN, IMAGENET_STD, resize, crop, interpolation, source)


def torchvision_weights(name: str, weights_file: str | None = None):
    """The member of torchvision's weight enum for model `name` that a weights file is (its file name, or the hash
    in it, as in the member's download URL: resnet50-0676ba61.pth is IMAGENET1K_V1), and whether it matched;
    DEFAULT when nothing matches. None for a name torchvision has no weights for."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None, False
    if weights_file:
        given = Path(weights_file).name
        for member in enum:
            file = member.url.rsplit("/", 1)[-1]
            digest = Path(file).stem.rsplit("-", 1)[-1]
            if given == file or (len(digest) >= 8 and f"-{digest}" in Path(given).stem):
                return member, True
    return enum.DEFAULT, False


def from_model(model_name: str, weights_file: str | None = None) -> Preprocess | None:
    """The eval preprocessing a torchvision or timm model's pretrained weights were made for (metadata only:
    nothing is downloaded), or None for other models. torchvision: the weight version whose file `weights_file`
    is, else DEFAULT (and the source says it was assumed)."""
    kind, _, name = model_name.partition(":")
    if kind == "torchvision":
        weights, matched = torchvision_weights(name, weights_file)
        if weights is None:
            return None
        t = weights.transforms()
        size = getattr(t, "crop_size", None) or getattr(t, "resize_size", None)  # segmentation: a resize alone
        if not size:
            return None
        source = f"torchvision {weights} metadata"
        if not getattr(t, "crop_size", None):
            source += f" (shorter side {size[0]}; a center crop of that size gives every batch one shape)"
        if not matched and weights_file:
            versions = ", ".join(m.name for m in type(weights))
            source += (f" (DEFAULT assumed: the weights file name matches none of {versions}; if your weights are "
                       "another version, give --preprocess imagenet or --image-size/--crop-pct)")
        elif not matched:
            source += " (DEFAULT assumed: no weights file given)"
        return Preprocess(tuple(t.mean), tuple(t.std), t.resize_size[0], size[0], t.interpolation.value, source)
    if kind == "timm":
        from ..models.registry import timm_module

        cfg = timm_module().get_pretrained_cfg(name)
        if cfg is None:
            return None
        cfg = cfg.to_dict()
        crop = int(cfg["input_size"][-1])
        resize = int(math.floor(crop / cfg.get("crop_pct", 0.875)))
        interp = cfg.get("interpolation", "bilinear")
        return Preprocess(tuple(cfg["mean"]), tuple(cfg["std"]), resize, crop,
                          interp if interp in INTERPOLATIONS else "bilinear", f"timm pretrained_cfg of {name}")
    if kind == "hf":
        return _from_hf(name)
    return None


HF_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's codes, as transformers' image processors store them


def _from_hf(name: str) -> Preprocess | None:
    """A Hugging Face model's eval preprocessing from its preprocessor_config.json (its image processor's settings):
    shorter side, center crop (crop_size, or ConvNeXt's crop_pct of the shortest edge), mean, std, resampling. None
    where the model has no such file or it names no size."""
    import json

    from ..models.pretrained import hf_file

    try:
        path = hf_file(name, "preprocessor_config.json")
    except Exception:  # offline: the dataset's convention, as for a model without metadata
        return None
    if path is None:
        return None
    cfg = json.loads(Path(path).read_text())
    size, crop_size = cfg.get("size"), cfg.get("crop_size")
    side = size.get("shortest_edge") or size.get("height") if isinstance(size, dict) else size
    if not isinstance(side, int):
        return None
    crop = None
    if cfg.get("do_center_crop", True) and isinstance(crop_size, dict) and crop_size.get("height"):
        crop = int(crop_size["height"])
    elif cfg.get("crop_pct") and side < 384:  # ConvNeXt's processor: shorter side / crop_pct, then a crop of side
        side, crop = int(side / cfg["crop_pct"]), side
    mean, std = cfg.get("image_mean", IMAGENET_MEAN), cfg.get("image_std", IMAGENET_STD)
    return Preprocess(tuple(mean), tuple(std), side, crop or side,
                      HF_RESAMPLE.get(cfg.get("resample"), "bilinear"), f"Hugging Face preprocessor_config of {name}")


def from_checkpoint(meta: dict) -> Preprocess | None:
    """A checkpoint's .json: 'preprocess' (this class's fields), or the 'normalization' our `train` writes."""
    if isinstance(meta.get("preprocess"), dict):
        p = meta["preprocess"]
        fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in p.items()
                  if k in Preprocess.__dataclass_fields__}
        return replace(Preprocess(**fields), source="checkpoint .json")
    norm = meta.get("normalization", meta)
    if isinstance(norm, dict) and "mean" in norm and "std" in norm:
        return Preprocess(tuple(norm["mean"]), tuple(norm["std"]), source="checkpoint .json normalization")
    return None


def resolve(preset: str, model_name: str, dataset: str, meta: dict | None = None, image_size: int | None = None,
            crop_pct: float | None = None, model_dataset: str | None = None,
            weights_file: str | None = None) -> Preprocess:
    """The preprocessing of one run. dataset: 'mnist', 'cifar10' or a folder path; model_dataset: the dataset
    a registry model is built for (its input size and convention), None for torchvision/timm models;
    weights_file: the checkpoint, whose name tells a torchvision weight version."""
    if preset not in PRESETS:
        raise UserError(f"--preprocess must be one of {', '.join(PRESETS)}, got '{preset}'")
    if is_tensor_file(dataset):  # model inputs as they are: nothing to resize or normalize
        if preset != "auto" or image_size is not None or crop_pct is not None:
            raise UserError(f"{dataset} holds the model's inputs as they are: --preprocess, --image-size and "
                            "--crop-pct apply to images")
        return Preprocess((), (), source=f"none: the inputs as {dataset} holds them")
    small = dataset in DATASET_NORMALIZATION
    conv = DATASET_NORMALIZATION.get(dataset, DATASET_NORMALIZATION["cifar10"])
    if preset == "imagenet":
        p = imagenet()
    elif preset == "cifar":
        p = Preprocess(*conv, source=f"{dataset if small else 'cifar10'} convention")
    elif preset == "none":
        p = Preprocess((0.0,) * len(conv[0]), (1.0,) * len(conv[0]), source="none (pixels in [0, 1])")
    else:
        p = from_checkpoint(meta or {})
        if p is None and not small and model_dataset in DATASET_NORMALIZATION:  # a 32x32 registry model
            p = Preprocess(*DATASET_NORMALIZATION[model_dataset], source=f"{model_dataset} convention ({model_name})")
        if p is None and not small:  # built-in 32x32 datasets keep their convention for any architecture
            p = from_model(model_name, weights_file)
            if p is None:
                p = imagenet(source="imagenet (the usual convention for image folders)")
        if p is None:
            p = Preprocess(*conv, source=f"{dataset} convention")
    if image_size is not None or crop_pct is not None:
        if image_size is not None and image_size < 1:
            raise UserError(f"--image-size must be a positive number of pixels, got {image_size}")
        if crop_pct is not None and not 0 < crop_pct <= 1:
            raise UserError(f"--crop-pct must be in (0, 1], got {crop_pct}")
        crop = image_size or p.crop or (32 if small else 224)
        pct = crop_pct or p.crop_pct or 1.0
        p = replace(p, crop=crop, resize=int(math.floor(crop / pct)), source=p.source + " (size overridden)")
    return p
