"""Compressed weight files: what a pruned (and quantized) network really needs to ship.

A state dict is written as one .safetensors file whose tensors are, per entry of the state dict, one of
  dense   the tensor as it is (any dtype): biases, small or barely pruned layers;
  sparse  a bitmask of the non-zeros (1 bit per weight, packed) and the non-zero values (float32);
  quant   the integer codes packed to their bit width (all of them, or only the non-zeros' with a bitmask),
          with one float32 scale and one uint8 zero point per output channel: w = scale * (code - zero).
Each entry takes whichever is smallest. The safetensors metadata records the encoding, shape and dtype of each
entry, so `load_compressed` rebuilds the state dict bit for bit with nothing but torch and safetensors.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..utils import UserError, atomic_file

FORMAT = "cnn-sparsegpt-compressed"
VERSION = 1
_SEP = "::"  # entry name :: part (state dict keys never contain it)


@dataclass(frozen=True)
class QuantGrid:
    """One weight's per-output-channel grid: w = scale * (code - zero) with codes in [0, 2^bits)."""
    scale: torch.Tensor  # (out_channels,) float32
    zero: torch.Tensor  # (out_channels,) uint8
    bits: int


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers < 2^bits (any shape) as a dense little-endian bit stream in uint8 bytes."""
    v = values.reshape(-1).to(torch.int32)
    stream = ((v[:, None] >> torch.arange(bits, dtype=torch.int32)) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
    weights = 1 << torch.arange(8, dtype=torch.int32)
    return (stream.reshape(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """The first `count` values of `pack_bits`' stream, as int32."""
    stream = (packed.to(torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32)) & 1
    stream = stream.reshape(-1)[:count * bits].reshape(count, bits)
    return (stream << torch.arange(bits, dtype=torch.int32)).sum(1, dtype=torch.int32)


def dequantize(codes: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """float32 weights of codes (out_channels, ...): the one formula export and load both use, so the two agree
    bit for bit; `+ 0.0` makes the zeros of negative scales +0.0."""
    rows = codes.reshape(codes.shape[0], -1).float()
    w = grid.scale.float()[:, None] * (rows - grid.zero.float()[:, None]) + 0.0
    return w.reshape(codes.shape)


def quant_codes(w: torch.Tensor, grid: QuantGrid, name: str) -> torch.Tensor:
    """The integer codes of weights that lie on their grid (checked: the codes give back w exactly)."""
    rows = w.reshape(w.shape[0], -1)
    codes = torch.round(rows / grid.scale[:, None]) + grid.zero.float()[:, None]
    codes = codes.clamp(0, 2 ** grid.bits - 1).to(torch.int32).reshape(w.shape)
    if not torch.equal(dequantize(codes, grid), w):
        raise UserError(f"{name}: the weights are not on their quantization grid (was model.pt edited?)")
    return codes


def _encode(name: str, t: torch.Tensor, grid: QuantGrid | None) -> tuple[dict, dict]:
    t = t.detach().cpu().contiguous()
    meta = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    n = t.numel()
    if grid is not None:
        codes = quant_codes(t, grid, name)
        kept = (codes.reshape(t.shape[0], -1) != grid.zero.to(torch.int32)[:, None]).reshape(n)  # code ≠ 0.0's
        nnz = int(kept.sum())
        parts = {"scale": grid.scale.float().clone(), "zero": grid.zero.to(torch.uint8).clone()}
        meta |= {"bits": grid.bits, "nonzero": nnz}
        if n + nnz * grid.bits < n * grid.bits:  # bitmask + the kept codes is smaller than every code
            meta["encoding"] = "quant_sparse"
            parts |= {"mask": pack_bits(kept, 1), "codes": pack_bits(codes.reshape(n)[kept], grid.bits)}
        else:
            meta["encoding"] = "quant"
            parts["codes"] = pack_bits(codes, grid.bits)
        return meta, parts
    if t.is_floating_point() and t.dtype == torch.float32:
        kept = t.reshape(n).view(torch.int32) != 0  # by bit pattern: a -0.0 is kept as a value, bit for bit
        nnz = int(kept.sum())
        if n + 32 * nnz < 32 * n:
            meta |= {"encoding": "sparse", "nonzero": nnz}
            return meta, {"mask": pack_bits(kept, 1), "values": t.reshape(n)[kept].clone()}
    meta["encoding"] = "dense"
    return meta, {"": t.clone()}  # safetensors refuses tensors that share memory


def _decode(name: str, meta: dict, parts: dict) -> torch.Tensor:
    shape, enc = meta["shape"], meta["encoding"]
    n = 1
    for s in shape:
        n *= s
    try:
        if enc == "dense":
            return parts[""]
        if enc == "sparse":
            kept = unpack_bits(parts["mask"], n, 1).bool()
            out = torch.zeros(n, dtype=parts["values"].dtype)
            out[kept] = parts["values"]
            return out.reshape(shape)
        grid = QuantGrid(parts["scale"], parts["zero"], meta["bits"])
        if enc == "quant":
            return dequantize(unpack_bits(parts["codes"], n, grid.bits).reshape(shape), grid)
        if enc == "quant_sparse":
            kept = unpack_bits(parts["mask"], n, 1).bool()
            codes = grid.zero.to(torch.int32).repeat_interleave(n // shape[0])
            codes[kept] = unpack_bits(parts["codes"], int(meta["nonzero"]), grid.bits)
            return dequantize(codes.reshape(shape), grid)
    except (KeyError, RuntimeError, IndexError) as e:
        raise UserError(f"compressed entry {name} is damaged ({type(e).__name__}: {e})") from None
    raise UserError(f"compressed entry {name} has an unknown encoding '{enc}' (written by a newer version?)")


def save_compressed(state: dict[str, torch.Tensor], path: str | os.PathLike,
                    grids: dict[str, QuantGrid] | None = None) -> dict:
    """Write `state` (a state dict, or a module's) compressed (weights named in `grids` as packed integer codes);
    returns the sizes: the file's bytes and, per encoding, how many entries and bytes."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("compressed files need the safetensors package: pip install safetensors") from None
    grids = grids or {}
    tensors, entries = {}, {}
    for name, t in state.items():
        if _SEP in name:
            raise UserError(f"state dict key '{name}' contains '{_SEP}'")
        meta, parts = _encode(name, t, grids.get(name))
        meta["bytes"] = nbytes(parts)
        entries[name] = meta
        tensors |= {f"{name}{_SEP}{part}" if part else name: p for part, p in parts.items()}
    header = {"format": FORMAT, "version": str(VERSION), "entries": json.dumps(entries)}
    atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata=header), suffix=".safetensors.tmp")
    summary: dict[str, dict] = {}
    for meta in entries.values():
        s = summary.setdefault(meta["encoding"], {"entries": 0, "bytes": 0})
        s["entries"] += 1
        s["bytes"] += meta["bytes"]
    return {"bytes": Path(path).stat().st_size, "encodings": summary}


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None):
    """The state dict `save_compressed` wrote, bit for bit. With `model` (the architecture, e.g.
    `create_model(...)` with the run's channel structure applied): that model with BatchNorm folded, as the
    compressed weights of `cnn-sparsegpt export --compressed` expect (a model torch.fx cannot trace: shaped from
    the file's keys, fold.folded_like), with the weights loaded, in eval mode."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise UserError("compressed files need the safetensors package: pip install safetensors") from None
    path = Path(path)
    if not path.is_file():
        raise UserError(f"compressed file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise UserError(f"{path} is not a cnn-sparsegpt compressed file (no '{FORMAT}' header): a plain "
                                "safetensors state dict loads with safetensors.torch.load_file")
            if int(header.get("version", 0)) > VERSION:
                raise UserError(f"{path} was written by a newer cnn-sparsegpt (format version {header['version']})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            entries = json.loads(header["entries"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read compressed file {path} ({str(e)[:160]})") from None
    grouped: dict[str, dict] = {name: {} for name in entries}
    for key, t in tensors.items():
        name, _, part = key.partition(_SEP)
        grouped.setdefault(name, {})[part] = t
    state = {name: _decode(name, meta, grouped[name]) for name, meta in entries.items()}
    if model is None:
        return state
    from .fold import fold_batchnorm, folded_like

    error = None
    for library_layers in (True, False):  # files written before timm's BatchNormAct2d was folded: torch's only
        try:
            folded = fold_batchnorm(model.cpu().eval(), library_layers)
        except UserError:  # a model torch.fx cannot trace: the folded shape from the file's keys
            folded = folded_like(model.cpu(), state)
        try:
            folded.load_state_dict(state)
            return folded.eval()
        except RuntimeError as e:
            error = error or e
    raise UserError(f"{path} does not fit this model once BatchNorm is folded ({str(error).splitlines()[0]}): "
                    "for a channel-pruned run, apply its structure first") from None
