"""Where a layer's output offset is free: a bias, or a BatchNorm that alone reads the layer (its running mean).

A layer followed by such a module can be fitted with an intercept: its solve works on centred inputs (the
covariance instead of the second moment), so no weight is spent on reproducing the mean output, and the mean's
change goes into the bias or the BatchNorm's running mean (which BatchNorm re-estimation sets anyway). Post-ReLU
inputs have means as large as their spread, so the uncentred Hessian spends much of its weight on a direction the
BatchNorm removes.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from .graph import module_calls, sole_batchnorm_reader, trace


def offset_sinks(model: nn.Module, names: list[str], traced: fx.GraphModule | None = None,
                 biases: bool = True) -> dict[str, nn.Module]:
    """Per layer of `names` whose output offset is free: the module that takes it, the layer itself (it has a bias;
    with biases=True) or the BatchNorm (with running statistics) that alone reads its output. Without a traced graph
    (the model cannot be traced) only biases are known. The weight-mask solve uses BatchNorms only: with biases the
    CIFAR CNN (no BatchNorm) lost 0.60 points at 70% on held-out images (docs/RESULTS.md, "The intercept"); the
    channel re-fits, plain least squares to the dense outputs, use both."""
    modules = dict(model.named_modules())
    out = {n: modules[n] for n in names if biases and getattr(modules[n], "bias", None) is not None}
    if traced is None:
        try:
            traced = trace(model)
        except Exception:  # the truncated-pass fallback prunes such models; their biases still take offsets
            return out
    for name, nodes in module_calls(traced, names).items():
        reader = sole_batchnorm_reader(nodes[0], modules, squeezed=True)
        if name not in out and len(nodes) == 1 and reader is not None:  # (a layer called twice may feed more)
            out[name] = modules[reader.target]
    return out


@torch.no_grad()
def fold_offset_(layer: nn.Module, sink: nn.Module, offset: torch.Tensor) -> None:
    """Add `offset` (one per output channel) to the layer's output through its sink."""
    if sink is layer:
        layer.bias.data += offset.to(layer.bias)
    else:  # a BatchNorm subtracts its running mean: the same as adding the offset before it
        sink.running_mean.data -= offset.to(sink.running_mean)
