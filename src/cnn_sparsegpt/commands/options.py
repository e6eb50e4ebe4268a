"""The options of one `prune` run (`PruneOptions`): where the model and data come from, what is measured and
written, and the PruneConfig of the prune itself. YAML files and flags give the fields of both flat; the CLI
builds one flag per field (cli.py)."""
from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

import yaml

from ..pruning.config import PRESETS, PRUNE_KEYS, RECOMMENDED, PruneConfig, type_ok, type_name, check_fields, opt
from ..utils import UserError


@dataclass(frozen=True)
class PruneOptions:
    """One `prune` run: where the model and data come from, what is measured and written, and the PruneConfig.
    YAML files and flags give the fields of both flat (`PruneOptions.build`)."""
    model: str = opt("", "model: a registry name, torchvision:NAME, timm:NAME (timm needs the [timm] extra), hf:NAME "
                     "(a Hugging Face image classifier, a Hub name or a local folder; the [hf] extra), or your "
                     "own as FILE.py:NAME or package.module:NAME (a function or nn.Module class that builds it, "
                     "given num_classes where it takes it)")
    model_kwargs: dict = opt({}, "keyword arguments for the model's builder, as KEY=VALUE (values read as Python "
                             "literals: width=64 dropout=0.1 name='a'; YAML: a mapping), for a model that needs more "
                             "than num_classes; report.json keeps them for export, finetune and latency",
                             check=lambda v: all(isinstance(k, str) and k.isidentifier() and k != "num_classes"
                                                 for k in v),
                             want="a mapping of argument names (num_classes comes from the checkpoint's head)")
    weights: str | None = opt(None, "checkpoint to prune: .pt/.pth/.ckpt (state_dict, also inside "
                              "'state_dict'/'model', under a Lightning module's attribute such as 'model.'; loaded "
                              "with weights_only=True) or .safetensors; the number of classes comes from its head. "
                              "'pretrained' (or pretrained:VERSION for torchvision, pretrained:REVISION for hf): a "
                              "torchvision, timm or Hugging Face model's published weights, downloaded once into "
                              "torch's (the Hub's) cache. None: random weights (a warning)")
    dataset: str | None = opt(None, "mnist, cifar10, an ImageFolder folder/.tar.gz with train/ and val/ (or test/) "
                              "subfolders of <class>/<image> (default: the model's), a folder of images without "
                              "labels, any layout, measured by --metric output (its train/ and val/ or test/ where it "
                              "has both, else evaluation images held out of it), or a tensor file (.pt) of model "
                              "inputs for models that do not take images: a dict with 'train' (N, ...) and optionally "
                              "'train_labels', 'test', 'test_labels', served as they are")
    data_dir: str | None = opt(None, "data root (default: $CNN_SPARSEGPT_DATA, else ~/.cache/cnn_sparsegpt/data)")
    preprocess: str = opt("auto", "auto: from the checkpoint's .json, else the model's pretrained metadata "
                          "(torchvision weights, timm pretrained_cfg), else the dataset's convention; imagenet: "
                          "shorter side 256, center crop 224, ImageNet mean/std; cifar: CIFAR-10 mean/std; none: "
                          "pixels in [0, 1]", ("auto", "imagenet", "cifar", "none"))
    image_size: int | None = opt(None, "center-crop size in pixels (overrides the preprocessing's)")
    crop_pct: float | None = opt(None, "crop size / resized shorter side, e.g. 0.875 (224 of 256)")
    streaming: str = opt("auto", "image folders: stream from the files with worker processes (on), decode all into "
                         "memory once (off), or choose by decoded size, streaming above 2 GiB (auto)",
                         ("auto", "on", "off"))
    workers: int | None = opt(None, "image-decoding processes when streaming (default min(8, cores); 0: decode in "
                              "this process)", check=lambda v: v >= 0, want=">= 0")
    nsamples: int = opt(1024, "calibration images drawn from the training set", check=lambda v: v >= 1,
                        want="at least 1")
    seed: int = opt(0, "seed of the calibration sample")
    device: str = opt("auto", "auto (CUDA if present), cpu, cuda or cuda:N")
    evaluate: bool = opt(True, "measure the dense and the pruned model on the test split (--metric)")
    metric: str = opt("auto", "what --evaluate measures: top1 (accuracy; a classifier on an ImageFolder of classes, "
                      "mnist or cifar10), output (the pruned model's outputs against the dense model's on the same "
                      "images, relative squared error; no labels: any model, any folder of images) or auto (top1 for "
                      "a classifier, (N, classes) logits, on labelled images; output otherwise)",
                      ("auto", "top1", "output"))
    eval_samples: int = opt(0, "evaluate on a fixed random subset of N test images (0 = all)", check=lambda v: v >= 0,
                            want=">= 0")
    holdout: int = opt(0, "evaluate on N held-out training images (not used for calibration) instead of the test "
                       "split: choose settings on these, not on the test set", check=lambda v: v >= 0, want=">= 0")
    reuse_dense: bool = opt(True, "take the dense model's top-1 from an earlier prune of the same checkpoint on the "
                            "same evaluation images, device and settings (a cache keyed by their digests) instead of "
                            "measuring it again; --no-reuse-dense measures")
    save_safetensors: bool = opt(False, "also write model.safetensors (needs the safetensors package)")
    out: str = opt("runs/prune", "output folder")
    recipe: str = opt("recommended", "what the settings of the prune start from: recommended (dense target + cg "
                      "re-solve, chosen on held-out images, see docs/RESULTS.md) or published (SparseGPT's layer "
                      "solve exactly as in the paper). Settings given explicitly win", tuple(PRESETS))
    config: PruneConfig = field(default=RECOMMENDED, metadata={"help": ""})

    def __post_init__(self):
        check_fields(self, "", skip=("config",))

    @classmethod
    def build(cls, values: dict | None = None, where: str = "options", **kw) -> PruneOptions:
        """From flat keys (a YAML file's, the given flags): the run's own fields, and the PruneConfig from the recipe
        named by `recipe` with the prune keys given replacing its fields."""
        values = check_options(cls, dict(values or {}) | kw, where)
        run = {k: v for k, v in values.items() if k not in PRUNE_KEYS}
        prune = {k: v for k, v in values.items() if k in PRUNE_KEYS}
        recipe = run.get("recipe", "recommended")
        if recipe not in PRESETS:
            raise UserError(f"recipe must be one of {', '.join(PRESETS)}, got {recipe!r}")
        return cls(**run, config=replace(PRESETS[recipe], **prune))


def option_fields() -> dict:
    """Every flat key of a prune run (YAML key and flag) → its dataclass field, run options first."""
    run = {f.name: f for f in fields(PruneOptions) if f.name != "config"}
    return run | {f.name: f for f in fields(PruneConfig)}


def check_options(cls, values: dict, where: str) -> dict:
    """Reject unknown keys and wrong types with one line that names the key and what it should be."""
    if cls is PruneOptions:
        known = option_fields()
        hints = typing.get_type_hints(PruneOptions) | typing.get_type_hints(PruneConfig)
    else:
        known = {f.name: f for f in fields(cls)}
        hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in known:
            raise UserError(f"{where}: unknown key '{key}'; valid keys: {', '.join(known)}")
        if key in ("sparsity", "nm") and value is not None:
            continue  # parsed (with its own messages) by Pattern.parse
        if not type_ok(value, hints[key]):
            raise UserError(f"{where}: '{key}' must be {type_name(hints[key])}, got {value!r}")
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


def load_yaml(path: str | Path, cls=None) -> dict:
    """A YAML file of flat prune-run keys, checked (unknown keys and wrong types name the file)."""
    return check_options(cls or PruneOptions, read_yaml_mapping(path), str(path))


def merge_options(file_values: dict, cli_values: dict) -> PruneOptions:
    """Defaults (the recipe's), then the YAML file, then the flags given on the command line."""
    values = dict(file_values)
    if "sparsity" in cli_values or "nm" in cli_values:  # a pattern flag replaces the file's pattern
        values.pop("sparsity", None)
        values.pop("nm", None)
    values.update(cli_values)
    return PruneOptions.build(values)


def field_default(f) -> object:
    return f.default if f.default is not MISSING else f.default_factory()
