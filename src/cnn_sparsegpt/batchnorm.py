"""BatchNorm re-estimation on the pruned network: as train mode does it (`recalibrate`, one whole forward per
batch), or from a BatchNorm's inputs alone (`bn_statistics_`, used by the graph executor)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Callable

import torch
from torch import nn

from . import dist


def bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate(bns: list, run: Callable, inputs: Iterable[torch.Tensor]) -> None:
    """Reset the running statistics of `bns` and re-estimate them as a cumulative average over what
    `run(x)` feeds them for each input (one BN on its inputs, or the whole model on the calibration set)."""
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for x in inputs:
        run(x)  # outputs are dropped at once: only the statistics are wanted
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
        bn.eval()


@torch.no_grad()
def bn_statistics_(bn: nn.modules.batchnorm._BatchNorm, inputs: Iterable[torch.Tensor]) -> None:
    """Set `bn`'s running statistics to what `recalibrate` gives (the average over batches of each batch's
    mean and unbiased variance, as train mode with momentum=None), without computing its output. The
    batch statistics are summed in float64 (over all ranks under torchrun), so their order hardly matters."""
    c = bn.running_mean.numel()
    sums = torch.zeros(2 * c + 1, dtype=torch.float64, device=bn.running_mean.device)
    for x in inputs:
        var, mean = torch.var_mean(x, dim=[0] + list(range(2, x.ndim)), correction=1)
        sums[:c] += mean
        sums[c:2 * c] += var
        sums[-1] += 1
    dist.all_sum_(sums, "adding BatchNorm statistics")
    if sums[-1] > 0:
        bn.running_mean.copy_(sums[:c] / sums[-1])
        bn.running_var.copy_(sums[c:2 * c] / sums[-1])
        bn.num_batches_tracked.fill_(int(sums[-1].item()))
