"""Run settings as dataclasses, loadable from YAML with every key and type checked."""
from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .utils import UserError


@dataclass
class PruneOptions:
    model: str = ""  # registry name (see `cnn-sparsegpt prune --help`), torchvision:NAME or timm:NAME
    weights: str | None = None  # .pt/.pth/.safetensors state dict; none = random weights (a warning)
    dataset: str | None = None  # mnist | cifar10 | ImageFolder path; default: the model's own
    data_dir: str | None = None  # data root; default $CNN_SPARSEGPT_DATA, else ~/.cache/cnn_sparsegpt/data
    preprocess: str = "auto"  # auto | imagenet | cifar | none (auto: checkpoint .json, then model, then dataset)
    image_size: int | None = None  # center-crop size in pixels (overrides the preprocessing's)
    crop_pct: float | None = None  # crop / resize of the shorter side, e.g. 0.875 = 224 of 256
    streaming: str = "auto"  # auto | on | off: stream an image folder from its files instead of decoding it all
    workers: int | None = None  # image-decoding processes for streamed folders (default min(8, cores))
    method: str = "sparsegpt"  # sparsegpt | magnitude | wanda
    sparsity: float | None = None  # unstructured fraction pruned, in [0, 1)
    nm: str | None = None  # N:M, N kept of every M input channels, e.g. 2:4
    nsamples: int = 1024  # calibration images drawn from the training set
    percdamp: float = 0.01  # damping, relative to the mean diagonal of H
    blocksize: int = 128  # columns per lazy-update block
    ignore: list = field(default_factory=list)  # layer names or regexes kept dense
    prune_all: bool = False  # also prune the first conv and the last linear
    bn_recalibration: bool = True  # re-estimate BatchNorm statistics on the pruned network
    allocation: str = "uniform"  # uniform | owl | dp: per-layer sparsities under one budget (unstructured)
    budget: str = "params"  # params | flops: what --sparsity counts when the allocation is not uniform
    owl_lambda: float = 0.1  # owl: layer sparsities within S ± λ
    dp_measure: str = "layer"  # dp: layer reconstruction error, or it scaled to each layer's output KL ("kl")
    bn_aware: bool = False  # weigh each output row's saliency by a following BatchNorm's (γ/σ)²
    stat_correction: bool = False  # give the pruned network the dense per-channel output statistics
    recipe: str = "recommended"  # recommended | published: what refine and dense_target default to (RECIPES)
    refine: str | None = None  # none | cg | admm: re-solve each pruned layer (cg: kept weights; admm: mask too)
    dense_target: bool | None = None  # fit each layer to the dense network's output, not W on the pruned inputs
    reconstruct: int = 0  # epochs of global reconstruction after the prune (masks fixed; 0 = one-shot only)
    wbits: int | None = None  # 8 | 4 | 3 | 2: kept weights quantized per output channel (None = float)
    quant: str = "gptq"  # gptq: rounded inside SparseGPT's loop, errors compensated; rtn: rounded after
    quant_clip: str = "minmax"  # minmax | mse: each channel's grid spans its weights, or the range of least error
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # calibration sample
    batch_size: int = 128  # calibration / evaluation batch size
    low_memory: bool | None = None  # None: by free memory; True: ~1 activation alive instead of 2, ~2.5 passes
    evaluate: bool = True  # measure dense and pruned top-1 on the test split
    eval_samples: int = 0  # evaluate on a fixed random subset of N test images (0 = all)
    holdout: int = 0  # evaluate on N held-out training images instead of the test split (to choose settings)
    save_safetensors: bool = False  # also write model.safetensors (needs the safetensors package)
    out: str = "runs/prune"  # output folder

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise UserError(f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.wbits and self.refine is None:
            self.refine = "none"  # a re-solve would move the kept weights off their quantization grids
        for key, value in RECIPES[self.recipe].items():
            if getattr(self, key) is None:
                setattr(self, key, value)


# The settings beyond SparseGPT's layer solve that `recipe` starts from; any of them given explicitly wins.
# recommended: chosen on held-out images (docs/RESULTS.md, "Beyond uniform SparseGPT"): on every model and level
# measured, the dense target with a cg re-solve gained over the published solve (ResNet-18 90%: -8.50 -> -1.93,
# ResNet-20 70%: -4.51 -> -1.68, 2:4 -1.67 -> -0.72), and it works with every method, N:M and torchrun.
RECIPES = {
    "recommended": {"refine": "cg", "dense_target": True},
    "published": {"refine": "none", "dense_target": False},  # SparseGPT as in the paper
}


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, hint)


def check_options(cls, values: dict, where: str) -> dict:
    """Reject unknown keys and wrong types with one line that names the key and what it should be."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"{where}: unknown key '{key}'; valid keys: {', '.join(known)}")
        if key in ("sparsity", "nm") and value is not None:
            continue  # parsed (with its own messages) by Pattern.parse
        if not _type_ok(value, hints[key]):
            want = str(hints[key]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise UserError(f"{where}: '{key}' must be {want}, got {value!r}")
    return values


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file that must hold a mapping; every failure is one clear UserError."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the config must be a mapping of key: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_yaml(path: str | Path, cls) -> dict:
    return check_options(cls, read_yaml_mapping(path), str(path))


def merge_options(cls, file_values: dict, cli_values: dict):
    """Defaults, then the YAML file, then the flags given on the command line."""
    values = dict(file_values)
    if "sparsity" in cli_values or "nm" in cli_values:  # a pattern flag replaces the file's pattern
        values.pop("sparsity", None)
        values.pop("nm", None)
    values.update(cli_values)
    return cls(**check_options(cls, values, "options"))


RECIPE_KEYS = ("recipe", "allocation", "budget", "owl_lambda", "dp_measure", "bn_aware", "stat_correction",
               "refine", "dense_target", "reconstruct", "wbits", "quant", "quant_clip")  # beyond uniform


def recipe_label(opts: PruneOptions) -> str:
    """The options beyond uniform SparseGPT that differ from the published method's, e.g.
    'refine=cg,dense_target=True' ('' for SparseGPT as published). Pinned to the published settings, not to
    PruneOptions' defaults, so that a label means the same in every results file whatever the defaults become."""
    published = PruneOptions(recipe="published")
    return ",".join(f"{k}={getattr(opts, k)}" for k in RECIPE_KEYS
                    if k != "recipe" and getattr(opts, k) != getattr(published, k))
