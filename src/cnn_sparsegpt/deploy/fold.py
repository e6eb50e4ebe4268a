"""BatchNorm folding: a deployed network runs each conv with the BatchNorm after it folded in."""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from ..utils import UserError


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` with every BatchNorm that directly follows a conv folded into it (torch.fx)."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(fx.symbolic_trace(model).eval(), inplace=False)
    except Exception as e:
        raise UserError(f"cannot fold BatchNorm: torch.fx cannot trace {type(model).__name__} ({e})") from e


@torch.no_grad()
def fold_factors(model: nn.Module, weights: list[str]) -> dict[str, torch.Tensor]:
    """For each weight name, the per-output-channel factor folding multiplies it by (1 where no BatchNorm
    follows): folding a copy whose weights are all ones gives exactly the factors the fold applies."""
    probe = {name: torch.ones_like(model.get_parameter(name)) for name in weights}
    state = model.state_dict() | probe
    probe_model = copy.deepcopy(model)
    probe_model.load_state_dict(state)
    folded = fold_batchnorm(probe_model).state_dict()
    return {name: folded[name].reshape(folded[name].shape[0], -1)[:, 0].clone() for name in weights}
