"""Small shared helpers: the user-facing error type, atomic writes, safe loads of tensor files, devices."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch


class UserError(Exception):
    """A mistake in the user's input. The CLI prints its message as one line and exits with status 2."""


def atomic_file(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Write through a temporary file in the same folder, then rename: readers never see a half file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    except OSError as e:
        raise UserError(f"cannot write to {path.parent}: {e.strerror or e}. Choose a writable folder.") from None
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def evaluation_mode(*models: torch.nn.Module):
    """The models in eval mode inside the block; after it every submodule's own mode as it was (a model whose
    BatchNorms were frozen in a training model stays so; model.train(flag) would set them all alike)."""
    tops = [(model, model.training) for model in models]
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, training in tops:  # modules put in while it ran (a channel prune's smaller layers) take the top's
            model.train(training)
        for m, training in saved:
            m.training = training


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module torch.compile wrapped (its OptimizedModule's _orig_mod, which shares every parameter), else model:
    a compiled model is pruned, exported and timed through its own module, and layers are named as in it."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) and type(model).__name__ == "OptimizedModule" else model


def as_module(model, what: str = "the model") -> torch.nn.Module:
    """`model` as the nn.Module the library works on (uncompiled: a torch.compile'd model's own module); anything
    else is a one-line UserError naming it (a state dict in its place is the usual slip)."""
    model = uncompiled(model)
    if isinstance(model, torch.nn.Module):
        return model
    hint = {"ExportedProgram": " (an ExportedProgram's .module() has no Conv or Linear modules either: use the "
                               "nn.Module before torch.export)"}.get(type(model).__name__, "")
    if isinstance(model, dict):
        hint = " (a state_dict? build the network and load it: model.load_state_dict(cs.load_state_dict(path)))"
    raise UserError(f"{what} must be an nn.Module, got {type(model).__name__}{hint}")


def cache_root() -> Path:
    """Where the package keeps what it can compute again (decoded images, layer timings): $CNN_SPARSEGPT_CACHE,
    else $XDG_CACHE_HOME/cnn_sparsegpt, else ~/.cache/cnn_sparsegpt."""
    root = os.environ.get("CNN_SPARSEGPT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / \
        "cnn_sparsegpt"
    return Path(root).expanduser()


def tensor_digest(h, tensors) -> None:
    """Feed each tensor's dtype, shape and bytes to the hashlib object h (fingerprints of weights and images)."""
    for t in tensors:
        flat = t.detach().reshape(-1).contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")


def file_stem(text: str) -> str:
    """`text` as a file name on any system: each run of characters other than letters, digits, '.', '_' and '-'
    becomes '_' (model names such as 'torchvision:resnet50' or 'models/my_net.py:build')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save, atomically."""
    return atomic_file(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors(state: dict, path: str | os.PathLike) -> Path:
    """A state dict as .safetensors, atomically (contiguous tensors that share no memory)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("--save-safetensors needs the safetensors package: pip install safetensors") from None
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    return atomic_file(path, lambda tmp: save_file(state, tmp))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_file(path, write)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=1, default=str) + "\n", path)


def ensure_writable(folder: str | os.PathLike) -> Path:
    """Fail early (before minutes of work) when results could not be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe."):
            pass
    except OSError as e:
        raise UserError(f"output folder {folder} is not writable: {e.strerror or e}") from None
    return folder


def load_tensors(path: str | os.PathLike, what: str = "file"):
    """A torch file of tensors (and plain containers) loaded with weights_only=True, every failure one UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    return _load_pickled(path, what)


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """A JSON object from a file, every failure (missing, unreadable, malformed, not an object) one UserError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}): the file is truncated or "
                        "was edited") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} does not hold a JSON object")
    return data


def _load_pickled(path: Path, what: str = "checkpoint"):
    try:
        with warnings.catch_warnings():  # a corrupt file's first bytes read as a pickle protocol: said below instead
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # A well-formed torch archive that the safe unpickler rejects holds Python objects besides tensors.
        if zipfile.is_zipfile(path):
            ref = re.search(r"GLOBAL ([\w.]+)", str(e))
            raise UserError(
                f"refused to load {path}: it is not a plain tensor {what} and could run code when loaded "
                f"({'it references ' + ref[1] if ref else 'it holds pickled Python objects'}). Save the model's "
                "state_dict() instead (a whole pickled model you trust: torch.save(torch.load(PATH, "
                "weights_only=False).state_dict(), NEW_PATH))") from None
        raise UserError(f"cannot read {what} {path}: the file is truncated or corrupt, or not a torch "
                        "file") from None
    except Exception as e:  # garbage bytes fail inside the unpickler in many ways (IndexError, KeyError, ...)
        raise UserError(f"cannot read {what} {path}: the file is truncated or corrupt ({first_line(e, 160)})") \
            from None


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first line of text (its type's name where it has none), cut to `limit` characters: what a
    one-line error quotes of a library's own."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def forward_checked(model: torch.nn.Module, x: torch.Tensor, what: str, hint: str = ""):
    """model(x) without gradients, or, where the model's own code fails on x (a model built for other inputs), a
    one-line UserError: 'the model cannot run on {what}: ...{hint}', the model's error chained."""
    try:
        with torch.no_grad():
            return model(x)
    except Exception as e:  # the model's own code: any type
        raise UserError(f"the model cannot run on {what}: {type(e).__name__}: {first_line(e)}{hint}") from e


def output_tensors(out) -> list[torch.Tensor]:
    """The tensors of a model's output, in order: the output itself, a dict's values (torchvision's segmentation
    models: 'out', 'aux'), a tuple's or list's items, nested ones flattened."""
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return [t for item in items for t in output_tensors(item)]


def classifier_logits(out) -> torch.Tensor | None:
    """A classifier's (N, classes) logits in a model's output: the output itself, or the 'logits' entry of a mapping
    (Hugging Face's ModelOutput, a user's dict); None where it holds none (a segmentation map, features)."""
    if isinstance(out, dict) and "logits" in out:
        out = out["logits"]
    return out if isinstance(out, torch.Tensor) and out.ndim == 2 and out.is_floating_point() else None


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise UserError(f"{what} has NaN or Inf values in {', '.join(bad[:3])}{more}")


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; an explicit device that does not exist is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{name}' asked for, but this machine has no CUDA GPU: use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"device '{name}' asked for, but this machine has no Apple MPS device: use --device cpu")
    elif dev.type != "cpu":
        raise UserError(f"unsupported device '{name}': use auto, cpu, cuda or cuda:N")
    return dev


@functools.cache
def git_commit() -> str:
    """The commit of the source tree this package runs from, or '' outside a git checkout: HEAD at the first call,
    which a long run (bench, a sweep) makes when it starts, so that its rows name the code it loaded even where
    commits land while it runs (rows of earlier runs named the HEAD of their writing)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def run_metadata(device: torch.device) -> dict:
    import datetime
    import platform

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"git_commit": git_commit(), "torch_version": torch.__version__, "device": f"{device.type}: {name}",
            "threads": torch.get_num_threads(), "date": datetime.datetime.now().isoformat(timespec="seconds")}
