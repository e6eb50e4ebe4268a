"""Fine-tuning a pruned model in any training loop with its sparsity kept exactly: the pruned weights are zeroed
now and after every optimizer step (an optimizer step post-hook), so momentum or weight decay never revives one."""
from __future__ import annotations

import torch
from torch import nn

from ..utils import UserError, as_module


class KeptMasks:
    """What keep_masks returns: apply() zeroes the pruned weights again; remove() stops doing it after each step."""

    def __init__(self, params: dict[str, nn.Parameter], keep: dict[str, torch.Tensor], optimizer):
        self.params, self.keep = params, keep
        self.handle = optimizer.register_step_post_hook(lambda *_: self.apply()) if optimizer is not None else None
        self.apply()

    def apply(self) -> None:
        with torch.no_grad():
            for name, keep in self.keep.items():
                param = self.params[name]
                if keep.device != param.device:  # the model moved since (model.to(device) after keep_masks)
                    keep = self.keep[name] = keep.to(param.device)
                param.mul_(keep)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def keep_masks(model: nn.Module, masks: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None
               ) -> KeptMasks:
    """masks: parameter name → bool tensor of its shape, True = kept (a prune's report.masks, a run's masks.pt).
    Zeroes the pruned weights of `model` now and, with `optimizer`, after each of its steps."""
    params = dict(as_module(model).named_parameters())  # (masks name a compiled model's layers as prune_model)
    if not isinstance(masks, dict):
        raise UserError(f"masks must be a dict of parameter name -> bool tensor (a prune's report.masks, a run's "
                        f"masks.pt), got {type(masks).__name__}")
    keep = {}
    for name, mask in masks.items():
        if name not in params:
            raise UserError(f"mask '{name}' names no parameter of {type(model).__name__}: masks of another model?")
        if not isinstance(mask, torch.Tensor) or mask.shape != params[name].shape:
            raise UserError(f"mask '{name}' has shape {tuple(getattr(mask, 'shape', ()))}, its parameter "
                            f"{tuple(params[name].shape)}")
        keep[name] = mask.to(device=params[name].device, dtype=params[name].dtype)
    return KeptMasks(params, keep, optimizer)
