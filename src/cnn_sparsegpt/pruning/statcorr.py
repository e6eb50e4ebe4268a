"""Statistics correction (OBC's `--statcorr`): after pruning, give the pruned network the dense
network's per-channel output statistics on the calibration images. Label-free, forward passes only.

- A pruned layer with a bias: its mean output per channel is W·x̄ + b (x̄ the mean input column, which
  the pruner has), so the bias is moved by the dense mean minus the pruned one: exact, no extra pass.
- A BatchNorm, after its recalibration on the pruned network: its running statistics are set so that
  its output has the dense network's per-channel mean and variance (plain recalibration would give
  mean β and variance γ² instead).
The dense targets come from one forward pass of the dense network before pruning.
"""
from __future__ import annotations

import torch
from torch import nn

from .graph import run_hooked


def _channel_moments(y: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    y = y.movedim(channel_dim, -1).reshape(-1, y.shape[channel_dim]).double()
    return y.sum(0), y.square().sum(0), y.shape[0]


class StatCorrection:
    @torch.no_grad()
    def __init__(self, model: nn.Module, batches: list, layers: list[str], bns: list[str]):
        modules = dict(model.named_modules())
        self.sums: dict[str, list] = {}
        hooks = []
        for name in layers + bns:
            m = modules[name]
            if name in layers and getattr(m, "bias", None) is None:
                continue  # nothing to correct (a following BatchNorm is corrected instead)
            dim = -1 if isinstance(m, nn.Linear) else 1

            def hook(mod, inp, out, name=name, dim=dim):
                s, sq, n = _channel_moments(out, dim)
                acc = self.sums.setdefault(name, [0.0, 0.0, 0])
                acc[0], acc[1], acc[2] = acc[0] + s, acc[1] + sq, acc[2] + n
            hooks.append(m.register_forward_hook(hook))
        run_hooked(model, batches, hooks)
        self.corrected: list[str] = []

    def _target(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if name not in self.sums:
            return None
        s, sq, n = self.sums[name]
        mean = s / n
        return mean, (sq / n - mean.square()).clamp_min(0)

    @torch.no_grad()
    def layer(self, name: str, module: nn.Module, pruner) -> None:
        """Move a pruned layer's bias so that its mean output per channel is the dense one."""
        target = self._target(name)
        if target is None or module.bias is None:
            return
        Wg, _ = pruner.weight_matrix()  # the pruned weights, columns in the order of x̄
        mean = torch.bmm(Wg, pruner.input_mean()[:, :, None]).reshape(-1).double() + module.bias.double()
        module.bias.add_((target[0].to(mean) - mean).to(module.bias))
        self.corrected.append(name)

    @torch.no_grad()
    def batchnorm(self, name: str, bn: nn.modules.batchnorm._BatchNorm) -> None:
        """After recalibration (running stats = the pruned input's mean μ and variance v): choose the running
        stats so that γ(x − rm)/√(rv + ε) + β has the dense output's mean m and variance s²."""
        target = self._target(name)
        if target is None or not bn.affine:
            return
        m, s2 = target
        mu, v = bn.running_mean.double(), bn.running_var.double()
        g, b = bn.weight.double(), bn.bias.double()
        ok = (g.abs() > 1e-12) & (s2 > 1e-12) & (v > 0)
        denom = torch.where(ok, g.square() * v / s2.to(v).clamp_min(1e-30), v + bn.eps)  # = rv + ε
        denom = denom.clamp_min(bn.eps)
        rm = torch.where(ok, mu - (m.to(mu) - b) * denom.sqrt() / torch.where(ok, g, torch.ones_like(g)), mu)
        bn.running_var.copy_((denom - bn.eps).clamp_min(0))
        bn.running_mean.copy_(rm)
        self.corrected.append(name)
