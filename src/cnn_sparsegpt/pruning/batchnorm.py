"""BatchNorm re-estimation on the pruned network: as train mode runs it (`recalibrate`, one whole forward per
batch), or from a BatchNorm's inputs alone (`bn_statistics_`, used by the graph executor).

Both set the running statistics to the mean and unbiased variance of the BatchNorm's input over every position
of every calibration image (pooled), not to an average of per-batch statistics: pooled moments are sums, so they
do not depend on how the images were batched or split over torchrun processes.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Callable

import torch
from torch import fx, nn

from . import dist


def bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def batch_moments(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x (channels in dim 1). On the CPU, BatchNorm's own statistics
    kernel: two passes, accumulated in double, 2.4-5.0x faster than var_mean over dims (0, 2, 3) of an NCHW tensor
    (docs/PERFORMANCE.md, "Whole-model prune: ResNet-50"); elsewhere var_mean (not measured there, and cheap)."""
    if x.device.type == "cpu":
        return torch.batch_norm_update_stats(x, None, None, 1.0)
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean, var


class PooledMoments:
    """Per-channel count, mean and unbiased variance of everything `add` is given, from float64 sums of each
    batch's float32 moments (Chan et al.'s pairwise combination):
    Σn_b, Σn_b·m_b, Σn_b·m_b², Σn_b·v_b (v_b: the batch's biased variance)."""

    def __init__(self, channels: int, device: torch.device):
        self.sums = torch.zeros(4 * channels + 1, dtype=torch.float64, device=device)  # and the batch count
        self.rows = self.sums[:-1].view(4, channels)

    def add(self, x: torch.Tensor) -> None:
        dims = [0] + list(range(2, x.ndim))
        n = x.numel() // x.shape[1]
        if n == 0:
            return
        mean, var = batch_moments(x.detach(), dims)
        mean = mean.double()
        self.rows[0] += n
        self.rows[1] += n * mean
        self.rows[2] += n * mean.square()
        self.rows[3] += n * var.double()  # n · biased variance = Σ(x − m_b)², the same as (n − 1) · unbiased
        self.sums[-1] += 1

    def set_running_stats_(self, bn: nn.modules.batchnorm._BatchNorm, group=None) -> None:
        """Write the pooled moments of all processes of `group` into `bn` (a collective with a group)."""
        dist.all_sum_(self.sums, "adding BatchNorm statistics", group)
        n, s1, s2, m2 = self.rows
        if n[0] == 0:
            return
        mean = s1 / n
        var = (m2 + s2 - n * mean.square()).clamp_min(0) / (n - 1).clamp_min(1)
        set_statistics_(bn, mean, var, int(self.sums[-1].item()))


def set_statistics_(bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor,
                    batches: int) -> None:
    """bn's running statistics: a mean and an unbiased variance (as train mode keeps it), over `batches` batches."""
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    bn.num_batches_tracked.fill_(batches)


def batchnorms_reading(gm: fx.GraphModule, layers) -> dict[str, str]:
    """Per Conv2d of `layers` whose output a BatchNorm2d with running statistics reads directly, both called once in
    the traced graph: that BatchNorm's name. Its statistics on the pruned network follow from the conv's ΣXXᵀ, column
    sums and pruned weight (LayerPruner.output_moments), without a pass over its input."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or not node.args:
            continue
        src, bn = node.args[0], gm.get_submodule(node.target)
        if (isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and isinstance(src, fx.Node)
                and src.op == "call_module" and src.target in layers and calls[src.target] == 1
                and isinstance(gm.get_submodule(src.target), nn.Conv2d)):
            out[src.target] = node.target
    return out


@torch.no_grad()
def recalibrate(bns: list, run: Callable, inputs: Iterable[torch.Tensor], group=None) -> None:
    """Re-estimate the running statistics of `bns` from what `run(x)` feeds them for each input (one BN on its
    inputs, or the whole model on the calibration set), in train mode: each BatchNorm normalizes a batch by that
    batch's statistics, as in training, and its running statistics become the pooled moments of its inputs."""
    moments = [PooledMoments(bn.running_mean.numel(), bn.running_mean.device) for bn in bns]
    hooks = [bn.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])) for bn, acc in zip(bns, moments)]
    modes = [bn.training for bn in bns]
    for bn in bns:
        bn.train()
    try:
        for x in inputs:
            run(x)  # outputs are dropped at once: only the statistics are wanted
    finally:
        for h in hooks:
            h.remove()
        for bn, mode in zip(bns, modes):
            bn.train(mode)
    for bn, acc in zip(bns, moments):
        acc.set_running_stats_(bn, group)
        bn.eval()


@torch.no_grad()
def bn_statistics_(bn: nn.modules.batchnorm._BatchNorm, inputs: Iterable[torch.Tensor], group=None) -> None:
    """Set `bn`'s running statistics to the pooled moments of `inputs` (what `recalibrate` gives) without
    computing its output; summed over the processes of `group` (torchrun)."""
    acc = PooledMoments(bn.running_mean.numel(), bn.running_mean.device)
    for x in inputs:
        acc.add(x)
    acc.set_running_stats_(bn, group)
