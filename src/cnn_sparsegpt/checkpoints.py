"""Reading a user's checkpoint as a state_dict, whatever saved it, without running code from the file: plain
state_dicts and the dicts training scripts wrap them in, safetensors, whole pickled models and pickled objects
beside the weights (read through inert stand-ins), and a wrapper's key prefix (a Lightning module's)."""
from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .utils import UserError, load_tensors


def load_state_dict(path: str | os.PathLike, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Load a checkpoint with weights_only=True: no code in the file is ever run.

    Accepts .pt/.pth (a plain state_dict, or a dict holding one under 'state_dict', 'model' or their EMA
    variants), a TorchScript archive's weights (torch.jit.save) and .safetensors; 'module.' (DataParallel/DDP)
    and '_orig_mod.' (torch.compile) prefixes go.
    Python objects pickled beside the tensors (timm's argparse.Namespace, a Hydra config) are read as inert
    stand-ins (Opaque), and so is a whole pickled nn.Module, whose parameters and buffers become its state_dict;
    a file with no state_dict in it that references code is refused, naming what it references.
    model: the keys are fitted to it where the file holds its weights under a wrapper's prefix (fit_keys).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    refs: list[str] = []
    if path.suffix == ".safetensors":
        obj = _load_safetensors(path)
    else:
        obj, refs = _load_checkpoint(path)
    modules = []  # the whole pickled nn.Modules found, read as their state_dicts

    def unwrapped(x):
        state = _module_state(x)
        if state is None:
            return x
        modules.append(x)
        return state

    obj = unwrapped(obj)
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        inner = unwrapped(obj.get(key)) if isinstance(obj, dict) else None
        if isinstance(inner, dict):
            obj = inner
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        if refs:
            raise UserError(f"refused to load {path}: it is not a plain tensor checkpoint and could run code when "
                            f"loaded (it references {', '.join(refs[:3])}), and no state_dict was found in it. Save "
                            "the model's state_dict() instead") from None
        raise UserError(f"{path} does not hold a state_dict (a dict of tensors)")
    if refs:
        what = "is a whole pickled model: its parameters and buffers were read as its state_dict" if modules \
            else "holds pickled Python objects beside its tensors: only the tensors were read"
        warnings.warn(f"{path} {what}, no code of {', '.join(refs[:3])}{', ...' if len(refs) > 3 else ''} run",
                      RuntimeWarning)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
    return state if model is None else fit_keys(state, model.state_dict().keys(), path)


def fit_keys(state: dict[str, torch.Tensor], keys, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """state with a wrapper's prefix removed where the model's own keys are all under one: a PyTorch Lightning
    module or a training script saves its network as an attribute ('model.conv1.weight', 'net.fc.bias'), beside
    whatever else it holds (a loss's weights, a teacher). A warning names the prefix and what was left out; a file
    with the weights under several prefixes (a model and its EMA copy) is a UserError; no fit: state as it is (the
    strict load then names the keys that differ)."""
    keys = list(keys)
    if not keys or set(keys) <= state.keys():
        return state
    anchor = keys[0]
    prefixes = sorted({k[:-len(anchor)] for k in state if k.endswith("." + anchor)}, key=len)
    fits = [p for p in prefixes if all(p + k in state for k in keys)]
    if len(fits) > 1:
        raise UserError(f"{path} holds the model's weights {len(fits)} times (under {', '.join(map(repr, fits))}): "
                        "save the copy you want as a plain state_dict")
    if not fits:
        return state
    prefix = fits[0]
    left = sorted({k.split(".")[0] for k in state if not k.startswith(prefix)})
    warnings.warn(f"{path}: the model's weights are those under '{prefix}'"
                  + (f"; left out: {', '.join(left[:3])}{', ...' if len(left) > 3 else ''}" if left else ""),
                  RuntimeWarning)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load_safetensors(path: Path) -> dict:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(f"{path}: reading .safetensors needs the safetensors package: "
                        "pip install 'cnn-sparsegpt[timm]' (or pip install safetensors)") from None
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read checkpoint {path}: not a valid safetensors file ({str(e)[:160]})") from None


class Opaque:
    """Stands in for an object a checkpoint pickled (argparse.Namespace, a config, an nn.Module) while its tensors are
    read: it keeps what the pickle hands it (constructor arguments, __dict__ state, items) and runs no code of the
    object's class."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, {}

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value


def _module_state(obj) -> dict[str, torch.Tensor] | None:
    """The state_dict of a whole pickled nn.Module read as Opaque (its parameters and persistent buffers, named as
    state_dict() names them), or None where obj is not one."""
    state = obj.state if isinstance(obj, Opaque) else None
    if not isinstance(state, dict) or not isinstance(state.get("_parameters"), dict):
        return None
    out = {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, t in [*state["_parameters"].items(), *((n, b) for n, b in (state.get("_buffers") or {}).items()
                                                     if n not in skip)]:
        if isinstance(t, torch.Tensor):
            out[name] = t.detach()
    for name, child in (state.get("_modules") or {}).items():
        out |= {f"{name}.{k}": v for k, v in (_module_state(child) or {}).items()}
    return out


def _load_checkpoint(path: Path) -> tuple[Any, list[str]]:
    """A checkpoint and the globals it references that weights_only refuses (read as Opaque, never imported or
    run; [] for a plain tensor file). Without torch's means for that (torch < 2.6) such a file is refused."""
    try:
        return load_tensors(path, "checkpoint"), []
    except UserError as refused:
        if _is_torchscript(path):
            return _torchscript_state(path, refused), []
        get_refs = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
        if get_refs is None or not zipfile.is_zipfile(path):
            raise
        try:
            refs = list(get_refs(str(path)))
            stand_ins = [(type(r.rsplit(".", 1)[-1], (Opaque,), {"__module__": "pickled"}), r) for r in refs]
            with torch.serialization.safe_globals(stand_ins):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # (a truncated file, a pickle the stand-ins cannot take): the first refusal says it
            raise refused from None
        return obj, refs


def _is_torchscript(path: Path) -> bool:
    """A torch.jit.save archive: a zip with the TorchScript code and constants beside the pickled data."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/constants.pkl") for name in z.namelist())


def _torchscript_state(path: Path, refused: UserError) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive (torch.jit.save: a model shipped for deployment, often
    the only copy of the trained weights), through torch.jit.load: TorchScript, not Python, so no code of the user's
    classes runs, and the model itself is never called."""
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception:
        raise refused from None
    warnings.warn(f"{path} is a TorchScript archive: its parameters and buffers were read as its state_dict",
                  RuntimeWarning)
    return {k: v.detach() for k, v in scripted.state_dict().items()}
