"""Data-parallel calibration on PyTorch's own engine: `torchrun ... -m cnn_sparsegpt prune ...`.

Each process (rank) takes a contiguous share of the calibration images (`shard`) and runs it through the same
executor. At each layer the ranks' unnormalized Hessian sums and counts are all-reduced in float64, rank 0
solves, and the pruned weight and mask are broadcast, so every rank goes on with identical weights; BatchNorm
statistics (pooled moments, batchnorm.py) and evaluation counts are reduced the same way. What is and is not
identical to a single process is stated in the README ("Several processes"). Every function takes the process group
explicitly and is a no-op without one: the library distributes only when `prune_model(process_group=...)` is given
(the CLI gives torchrun's, `process_group()`), never because a process group happens to exist.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import warnings

import torch
import torch.distributed as td
from torch import nn

from ..utils import UserError, first_line


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_group():
    """The processes torchrun started, as a process group to hand to `prune_model(process_group=...)`, or None
    outside torchrun (or with one process). Only the CLI asks for it: the library never distributes on its own."""
    if td.is_available() and td.is_initialized() and td.get_world_size() > 1:
        return td.group.WORLD
    return None


def active(group=None) -> bool:
    return group is not None and td.get_world_size(group) > 1


def world(group=None) -> int:
    return td.get_world_size(group) if active(group) else 1


def rank(group=None) -> int:
    return td.get_rank(group) if active(group) else 0


def is_main(group=None) -> bool:
    return rank(group) == 0


def timeout_seconds() -> float:
    """How long a collective waits for the other ranks before failing (CNN_SPARSEGPT_DIST_TIMEOUT, default 600 s:
    the longest single-layer solve must fit in it)."""
    return float(os.environ.get("CNN_SPARSEGPT_DIST_TIMEOUT", "600"))


def init(device: str = "auto") -> torch.device:
    """Join the process group torchrun describes and return this rank's device: cuda:LOCAL_RANK with NCCL
    when CUDA is asked for (or `auto` and there is a GPU per local rank), else the CPU with gloo."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.startswith("cuda"):
        if gpus < local_world:
            raise UserError(f"--device {device} with {local_world} processes on this machine needs {local_world} "
                            f"GPUs; {gpus} found. Start fewer processes (--nproc_per_node) or use --device cpu")
        dev = torch.device("cuda", local_rank)
    elif device == "auto" and gpus >= local_world:
        dev = torch.device("cuda", local_rank)
    elif device in ("auto", "cpu"):
        if device == "auto" and 0 < gpus < local_world and local_rank == 0:
            warnings.warn(f"{local_world} processes but {gpus} GPUs: running on the CPU", RuntimeWarning)
        dev = torch.device("cpu")
    else:
        raise UserError(f"unknown --device '{device}': use auto, cpu, cuda or cuda:N")
    if not td.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        td.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                              timeout=datetime.timedelta(seconds=timeout_seconds()))
    return dev


def close() -> None:
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # a timeout or a peer that died: say so, naming this rank, instead of a backend trace
        first = first_line(e, 300)
        where = f"rank {td.get_rank()} of {td.get_world_size()}" if td.is_initialized() else "this process"
        raise UserError(f"{where}: {what} failed ({first}). Another rank probably stopped "
                        "first: see its own error above") from e


def all_sum_(t: torch.Tensor, what: str = "all-reduce", group=None) -> torch.Tensor:
    """t summed over the processes of `group` in place (nothing without one)."""
    if active(group):
        _collective(what, td.all_reduce, t, op=td.ReduceOp.SUM, group=group)
    return t


def shard(batches: list, group=None) -> list:
    """This rank's share of the calibration images, contiguous and in order. With at least one batch per rank the
    shares are runs of whole batches: every per-batch computation (the forward passes, the chunked Hessian products)
    is then the one a single process does, and the sums differ only in the order of their float64 additions.
    With fewer batches than ranks, the images are split evenly and batches are cut: the float32 products of the
    chunks around the cuts round differently, so the result equals one process's up to float rounding."""
    if not active(group):
        return batches
    n, w, r = sum(len(x) for x in batches), world(group), rank(group)
    if w > n:
        raise UserError(f"{w} processes but only {n} calibration images: every process needs at least one. "
                        "Use fewer processes or more --nsamples")
    if len(batches) >= w:
        bounds = torch.arange(len(batches)).tensor_split(w)[r]
        return [batches[i] for i in bounds.tolist()]
    sizes = [len(x) for x in torch.arange(n).tensor_split(w)]
    start = sum(sizes[:r])
    stop = start + sizes[r]
    share, offset = [], 0
    for x in batches:  # the parts of the batches that fall in [start, stop)
        a, b = max(start - offset, 0), min(stop - offset, len(x))
        if a < b:
            share.append(x[a:b])
        offset += len(x)
    return share


def check_same(text: str, what: str) -> None:
    """Fail on every rank, clearly, if the processes torchrun started were given different `what` (arguments)."""
    group = process_group()
    if group is None:
        return
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    seen = [None] * world(group)
    _collective(f"comparing {what}", td.all_gather_object, seen, digest)
    if len(set(seen)) > 1:
        groups = {}
        for r, h in enumerate(seen):
            groups.setdefault(h, []).append(r)
        raise UserError(f"the processes were started with different {what} (ranks grouped by them: "
                        f"{sorted(groups.values())}): start every rank with the same command")


def reduce_statistics_(pruner, group=None) -> None:
    """Turn a LayerPruner's per-rank sums (ΣXXᵀ, Σ(X_d−X_p)X_pᵀ, column sums; all float64) and sample count into
    those of all ranks' inputs, before H is formed from them: the same H as one process's up to the order of
    float64 additions (see LayerPruner)."""
    if not active(group):
        return
    pruner.flush()
    n = torch.tensor([float(pruner.nsamples), float(pruner.batches)], dtype=torch.float64,
                     device=pruner.layer.weight.device)
    all_sum_(n, f"{pruner.name}: adding sample counts", group)
    for attr in ("S", "SD", "SE", "shift_sum", "colsum", "colsum_d", "colsq"):
        if getattr(pruner, attr) is not None:
            all_sum_(getattr(pruner, attr), f"{pruner.name}: adding its input statistics", group)
    if getattr(pruner, "active", None) is not None:  # per-row sums over active outputs (relu_gate.py)
        for t in pruner.active.tensors().values():
            all_sum_(t, f"{pruner.name}: adding its per-row statistics", group)
    pruner.nsamples, pruner.batches = (int(v) for v in n.tolist())


def broadcast_layer(module: nn.Module, result, group=None):
    """Rank 0's pruned weight (and bias) and its LayerResult (mask included), on every rank."""
    if not active(group):
        return result
    main = is_main(group)
    if main and result.mask is not None:
        result.mask = result.mask.cpu()  # pickled: a device tensor would arrive on rank 0's device
    box = [result if main else None]
    src = td.get_global_rank(group, 0)
    _collective(f"receiving the pruned {getattr(result, 'name', 'layer')}", td.broadcast_object_list, box, src=src,
                group=group)
    for p in (module.weight, getattr(module, "bias", None)):
        if isinstance(p, torch.Tensor):
            _collective("receiving pruned weights", td.broadcast, p.data, src=src, group=group)
    return box[0]


def broadcast_module_(model: nn.Module, group=None) -> None:
    """Rank 0's parameters and buffers on every rank: the ranks must start from the same model (a randomly
    initialized one differs from process to process)."""
    if not active(group):
        return
    src = td.get_global_rank(group, 0)
    for t in list(model.parameters()) + list(model.buffers()):
        _collective("receiving the model from rank 0", td.broadcast, t.data, src=src, group=group)


def sum_counts(*values: float, group=None) -> list[float]:
    """Plain numbers added over the processes of `group` (e.g. correct predictions and images)."""
    if not active(group):
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if td.get_backend(group) == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    all_sum_(t, "adding counts", group)
    return t.tolist()
