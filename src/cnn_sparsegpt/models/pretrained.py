"""`--weights pretrained`: a torchvision or timm model's published weights, downloaded once into torch's hub cache
($TORCH_HOME/hub/checkpoints, where torchvision keeps them too), or a Hugging Face model's file (the Hub's cache, or
the model's local folder), used from there as a checkpoint file, so that report.json names a file and every later
command (finetune, latency, export) runs offline."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import torch

from ..utils import UserError, atomic_save, file_stem
from .registry import hf_module, timm_module

PRETRAINED = "pretrained"  # --weights pretrained, or pretrained:TAG for a torchvision weight version


def is_pretrained(weights: str | None) -> bool:
    return weights is not None and (weights == PRETRAINED or weights.startswith(PRETRAINED + ":"))


def pretrained_file(model: str, weights: str, progress: bool = True) -> str:
    """The local file of `model`'s published weights (downloaded if it is not there yet). weights: 'pretrained'
    (torchvision's DEFAULT version, timm's default tag) or 'pretrained:VERSION' (torchvision, e.g. IMAGENET1K_V1;
    timm names its tag in the model name: timm:resnet50.a1_in1k)."""
    kind, _, arch = model.partition(":")
    version = weights.partition(":")[2]
    if kind == "torchvision":
        return _torchvision_file(arch, version or "DEFAULT", progress)
    if kind == "timm":
        if version:
            raise UserError(f"timm names its weights in the model name: --model timm:{arch}.{version} --weights "
                            "pretrained")
        return _timm_file(arch)
    if kind == "hf":
        return _hf_file(arch, version)
    raise UserError(f"--weights pretrained is for torchvision:NAME, timm:NAME and hf:NAME models; give {model} a "
                    "checkpoint file")


def _cache() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _unreachable(what: str, e: Exception) -> UserError:
    return UserError(f"could not download {what} ({type(e).__name__}: {str(e).strip()[:160]}): download the file "
                     "elsewhere and give its path to --weights")


def _torchvision_file(arch: str, version: str, progress: bool) -> str:
    import torchvision

    try:
        versions = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise UserError(f"torchvision:{arch} has no published weights: give a checkpoint file") from None
    names = [w.name for w in versions]
    if version != "DEFAULT" and version not in names:
        raise UserError(f"torchvision:{arch} has no weights '{version}': one of DEFAULT, {', '.join(names)}")
    chosen = versions.DEFAULT if version == "DEFAULT" else versions[version]
    path = _cache() / Path(urlparse(chosen.url).path).name  # its name tells the version (data/preprocess.py)
    if not path.is_file():
        digest = torch.hub.HASH_REGEX.search(path.name)  # torchvision's files carry their hash's prefix
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(chosen.url, str(path), hash_prefix=digest[1] if digest else None,
                                           progress=progress)  # (through a temporary file: never half a file)
        except Exception as e:  # offline, a proxy, a full disk, a hash that does not match
            raise _unreachable(f"torchvision:{arch} {chosen.name} from {chosen.url}", e) from None
    return str(path)


def _timm_file(arch: str) -> str:
    timm = timm_module()
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError as e:  # (a tag timm does not know)
        raise UserError(f"timm:{arch}: {e}") from None
    if cfg is None:
        raise UserError(f"timm:{arch} has no published weights: give a checkpoint file")
    name = arch if "." in arch else f"{arch}.{cfg.tag}"  # the default tag, named, so that a new default is a new file
    path = _cache() / f"timm_{file_stem(name)}.pt"
    if not path.is_file():
        try:
            model = timm.create_model(name, pretrained=True)  # timm's own download (Hugging Face Hub or its URL)
        except Exception as e:
            raise _unreachable(f"the weights of timm:{name}", e) from None
        atomic_save(model.state_dict(), path)
    return str(path)


HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # a transformers model's weight files, preferred first


def hf_file(name: str, file: str, revision: str = "") -> str | None:
    """A file of Hugging Face model `name`: in its local folder, or from the Hub (downloaded once into its cache);
    None where the model has no such file."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder / file) if (folder / file).is_file() else None
    hf_module()
    import huggingface_hub

    try:
        return huggingface_hub.hf_hub_download(name, file, revision=revision or None)
    except huggingface_hub.utils.EntryNotFoundError:
        return None


def _hf_file(name: str, revision: str) -> str:
    for file in HF_WEIGHTS:
        try:
            path = hf_file(name, file, revision)
        except Exception as e:  # offline, a name the Hub does not have, a revision it does not know
            raise _unreachable(f"the weights of hf:{name}", e) from None
        if path is not None:
            return path
    raise UserError(f"hf:{name} has no {' or '.join(HF_WEIGHTS)}: give a checkpoint file")
