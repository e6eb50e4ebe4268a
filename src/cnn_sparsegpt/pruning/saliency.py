"""BN-aware saliency: a conv (or Linear) that feeds a BatchNorm is what a deployed model runs with the
BN folded in, W·γ/σ per output row. Unstructured masks compare weights across rows, so each row's
saliency is weighted by its (γ/σ)², as if the BN were folded before choosing the mask."""
from __future__ import annotations

import torch
from torch import nn

from .graph import trace


def bn_row_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: (γ/√(running_var + ε))² per output channel} for every Conv2d/Linear whose only user
    is a BatchNorm; {} for a model torch.fx cannot trace."""
    try:
        gm = trace(model)
    except Exception:
        return {}
    modules = dict(model.named_modules())
    scales = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), (nn.Conv2d, nn.Linear)):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        bn = modules.get(users[0].target)
        layer = modules[node.target]
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.affine and bn.track_running_stats \
                and bn.num_features == layer.weight.shape[0]:
            scales[node.target] = (bn.weight.detach() / (bn.running_var + bn.eps).sqrt()).square()
    return scales
