"""Global reconstruction with the masks fixed (`--reconstruct EPOCHS`, global AdaPrune): after the one-shot
prune, a few passes of Adam over the calibration images move the kept weights so that every pruned
layer's output matches the dense network's on the same images. Label-free; BatchNorm statistics stay
frozen during it and are re-estimated afterwards. Not one-shot any more: its rows are named so.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .masks_kept import keep_masks


def reconstruct(model: nn.Module, dense: nn.Module, batches: list[torch.Tensor], masks: dict[str, torch.Tensor],
                epochs: int, lr: float = 1e-4, progress: bool = True) -> list[float]:
    """Adam on the pruned layers' weights (and biases) of `model`, minimizing Σ_layers mean ‖y_pruned − y_dense‖²
    / mean ‖y_dense‖² over `batches`, with `masks` (parameter name → True = kept) applied to every step.
    Returns the loss of each epoch."""
    modules = dict(model.named_modules())
    dense_modules = dict(dense.named_modules())
    names = [k[:-len(".weight")] for k in masks]
    keep = {n: masks[n + ".weight"].to(modules[n].weight.device) for n in names}
    params = [p for n in names for p in modules[n].parameters(recurse=False)]
    was_training, grad_flags = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()  # BatchNorm statistics frozen (re-estimated by the caller)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    kept = keep_masks(model, masks, opt)
    outs: dict[str, torch.Tensor] = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o)) for n in names]
    targets: dict[str, torch.Tensor] = {}
    dense_hooks = [dense_modules[n].register_forward_hook(lambda m, i, o, n=n: targets.__setitem__(n, o))
                   for n in names]
    losses = []
    try:
        with torch.enable_grad():  # prune_model runs under no_grad
            for _ in tqdm(range(epochs), desc="reconstruct", unit="epoch", disable=not progress, leave=False):
                losses.append(_epoch(model, dense, batches, names, modules, keep, opt, outs, targets))
    finally:
        for h in hooks + dense_hooks:
            h.remove()
        kept.remove()
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return losses


def _epoch(model, dense, batches, names, modules, keep, opt, outs, targets) -> float:
    total = 0.0
    for x in batches:
        with torch.no_grad():
            dense(x)
        model(x)
        loss = sum((outs[n] - targets[n]).square().mean() / targets[n].square().mean().clamp_min(1e-12)
                   for n in names) / max(len(names), 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for n in names:  # pruned weights get no update and stay exactly zero
            modules[n].weight.grad.mul_(keep[n])
        opt.step()  # and the pruned weights zeroed again (keep_masks)
        total += loss.item()
        outs.clear()
        targets.clear()
    return total / max(len(batches), 1)
