"""The model-level driver: sequential one-shot pruning of every Conv2d and Linear of any nn.Module.

The calibration set goes through the network once. With a torch.fx trace the graph is run node by
node over all calibration batches (graph.py): when a layer is reached its Hessian is complete, so it is
pruned before its output is computed, and every later layer sees the already-pruned network (layers that
read the same tensor, such as a residual block's conv1 and downsample, share it). BatchNorm is
re-estimated the same way, from the pruned network's activations. Models fx cannot trace fall back to
one (truncated) forward pass per layer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from . import dist
from .allocation import allocate, nm_dense_layers
from .config import RECOMMENDED, PruneConfig, layer_pattern
from .batchnorm import batchnorms_reading, bn_modules, bn_statistics_, recalibrate, set_statistics_
from .conv_views import VIEWABLE, conv2d_views, original_result, renamed, view_names, view_positions, viewable
from .dense_target import DenseInputs
from .resume import PruneCheckpoints, fingerprint, restored_results
from .relu_gate import GATE_FLOPS, ReluGate, applies as gate_applies, dense_active, relu_gates
from .residual_target import SkipPartner, inverse_scale, skip_partners, target_shift
from .intercept import fold_offset_, offset_sinks
from .graph import (PRUNABLE, GraphExecutor, GraphStop, layer_inputs, memory_policy, nonstandard_layers, opaque_part,
                    partial_trace, stored_parts, trace)
from .heap import reuse_freed_memory
from .layer import LayerPruner, LayerResult, output_error
from .layer_plan import (IGNORED, choose_layers, forward_order, ignored_layers, patterned_layers, refit_layers,
                         unsupported_layers)
from ..kernels.masks import Pattern
from .permute import permute_for_nm_
from .reconstruct import reconstruct as reconstruct_model
from .saliency import bn_row_scales
from ..kernels.solver import NEEDS
from .statcorr import StatCorrection
from .slicing import spec_entry
from .channels import channel_groups
from .structured import prune_channels
from ..utils import UserError, as_module, evaluation_mode, forward_checked, output_tensors


@dataclass
class PruneReport:
    """What `prune_model` did: the resolved config it ran and each layer's result."""
    config: PruneConfig  # resolved: no 'auto' left
    nsamples: int  # calibration images, over all processes
    layers: list[LayerResult]
    seconds: float = 0.0  # pruning wall time, evaluation excluded
    sparsity: float = 0.0  # achieved, over the pruned layers
    total_sparsity: float = 0.0  # achieved, over all conv and Linear weights
    forward_passes: float = 0.0  # full calibration passes spent (the fx path needs 1; low_memory a few)
    peak_stored_mb: float | None = None  # most activations of the calibration set held at once (fx path)
    memory_policy: str = ""  # default or low-memory, and why (chosen by free memory unless asked); parts stored
    allocation: dict = field(default_factory=dict)  # kind, budget and (dp) the error database; layers hold sparsities
    reconstruct: dict = field(default_factory=dict)  # epochs and loss per epoch of the global reconstruction
    stat_corrected: list = field(default_factory=list)  # layers and BatchNorms given the dense output statistics
    timings: dict = field(default_factory=dict)  # seconds per phase
    world_size: int = 1  # processes that shared the calibration set (torchrun)
    bn_recalibrated: bool = False  # BatchNorm statistics re-estimated (the config asked and the model has some)
    structure: dict = field(default_factory=dict)  # structure='channels': targets, MACs/params, groups, new shapes
    permutation: dict = field(default_factory=dict)  # permute: per group of channels, swaps and saliency kept
    resumed_layers: int = 0  # layers an interrupted prune had finished (resume=...): their seconds were spent before
    stages: list = field(default_factory=list)  # channels with a pattern: each stage's resolved config, in order

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def pattern(self) -> str:
        if self.config.structure != "channels":
            return str(self.config.pattern)
        return "channels" + (f"+{self.config.pattern}" if self.config.sparsity is not None or self.config.nm is not None
                             else "")

    @property
    def quantized(self) -> dict[str, dict]:
        """Parameter name → integer codes (weight's shape), scale and zero point per output channel, bits."""
        return {f"{r.name}.weight": r.quant for r in self.layers if r.quant is not None}

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name → boolean mask (True = kept), for the layers that were pruned."""
        return {f"{r.name}.weight": r.mask.cpu() for r in self.layers if not r.skipped and r.mask is not None}

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("layers", "config")}
        return d | {"config": self.config.as_dict(), "layers": [r.as_dict() for r in self.layers]}

    to_json = as_dict  # the JSON object report.json holds these under (commands/report.py adds the run's own keys)

    @classmethod
    def from_json(cls, data: dict) -> PruneReport:
        """A report read back from report.json (any schema, commands.report.upgrade first): config and per-layer
        results; masks and integer codes live in masks.pt and quant.pt, not here."""
        known = {f.name for f in dataclasses.fields(PruneConfig)}
        config = PruneConfig(**{k: v for k, v in data["config"].items() if k in known})
        layer_keys = {f.name for f in dataclasses.fields(LayerResult)} - {"mask", "quant"}
        layers = [LayerResult(**{k: v for k, v in r.items() if k in layer_keys}) for r in data.get("layers", [])]
        own = {f.name for f in dataclasses.fields(cls)} - {"config", "layers", "nsamples"}
        return cls(config, data.get("nsamples", 0), layers, **{k: data[k] for k in own if k in data})


ITERABLE_NSAMPLES = 1024  # images read from an iterable of batches unless nsamples says (the CLI's --nsamples)


def _as_batches(calibration, device: torch.device, batch_size: int, nsamples: int | None = None
                ) -> list[torch.Tensor]:
    """The calibration inputs as batches on `device`: a tensor's first nsamples (all without it), an iterable's
    first nsamples, or ITERABLE_NSAMPLES with a warning where it holds more (a training DataLoader would otherwise
    be read to its end before anything is pruned)."""
    if nsamples is not None and nsamples < 1:
        raise UserError(f"nsamples must be at least 1, got {nsamples}")
    limit = nsamples or (len(calibration) if isinstance(calibration, torch.Tensor) else ITERABLE_NSAMPLES)
    if isinstance(calibration, torch.Tensor):
        calibration = calibration[:limit].split(batch_size)
    batches, taken, more = [], 0, False
    for b in calibration:
        if taken >= limit:
            more = True
            break
        x = b[0] if isinstance(b, (tuple, list)) and b else b
        if not isinstance(x, torch.Tensor):  # (a dict of a data pipeline's fields, say)
            raise UserError(f"calibration batches must be tensors of inputs or (inputs, labels) pairs, got "
                            f"{type(b).__name__}: pass the input tensors, e.g. (batch['image'] for batch in loader)")
        more = len(x) > limit - taken
        batches.append(x[:limit - taken].to(device))
        taken += len(batches[-1])
    if more and nsamples is None:
        warnings.warn(f"calibration: read the first {limit} images of the iterable, which holds more: pass "
                      "nsamples= to take another number", RuntimeWarning)
    if not batches or taken == 0:
        raise UserError("the calibration set is empty: give at least one image")
    if any(b.is_floating_point() and not torch.isfinite(b).all() for b in batches):  # (else a failed factorization)
        raise UserError("the calibration inputs hold NaN or infinite values: clean or re-make them before pruning")
    return batches


CPU_BATCH_BYTES = 128 * 2**20  # the widest layer input of one calibration batch the executor runs, on a CPU


def cpu_batches(batches: list[torch.Tensor], per_image: int) -> list[torch.Tensor]:
    """The calibration batches split (views, no copy) so that the widest layer input of each is at most
    CPU_BATCH_BYTES: on a CPU the executor's forward slows down as batches grow (ResNet-50 at 224², 512 images,
    node by node: 54.9 s in batches of 128, 38.3 s in batches of 32; docs/PERFORMANCE.md). Since segments run
    batch by batch, 48 MB parts made the forward faster and the Hessian sums (smaller products) slower by as much
    (benchmarks/commit_ab.py, ResNet-50 1024 images): 128 MB kept. Each batch is split the same way wherever it is,
    and its parts add one float64 term to a layer's sums (part_ends), so torchrun's per-batch sums stay the same
    terms. Small inputs (CIFAR: 64×32×32 floats per image) keep their batches."""
    most = cpu_batch_images(per_image)
    return [part for b in batches for part in b.tensor_split(-(-len(b) // most))]  # near-equal parts


def part_ends(batches: list[torch.Tensor], parts: list[torch.Tensor]) -> set[int]:
    """Indices of the parts (cpu_batches' split of `batches`, in order) that end a calibration batch: a layer's sums
    take one float64 term per calibration batch however it was split (LayerPruner.add_batch's end)."""
    bounds, total = set(), 0
    for b in batches:
        total += len(b)
        bounds.add(total)
    ends, total = set(), 0
    for i, p in enumerate(parts):
        total += len(p)
        if total in bounds:
            ends.add(i)
    return ends


def cpu_batch_images(per_image: int) -> int:
    """The most images a CPU batch holds: its widest layer input (per_image bytes each) within CPU_BATCH_BYTES."""
    return max(1, CPU_BATCH_BYTES // max(per_image, 1))


class _Pruner:
    """Holds the run's settings and the per-layer results; the two executors call `prune_layer`."""

    def __init__(self, model, plan, config, progress, patterns=None, row_scales=None, statcorr=None, dense=None,
                 group=None, sinks=None, refits=(), configs=None):
        self.model, self.plan, self.config = model, plan, config  # config: a resolved PruneConfig
        self.configs = configs or {}  # layers with a pattern of their own (layer_patterns): the config of that pattern
        self.refits = set(refits)  # layers kept dense whose weights are re-fitted to the dense target
        self.patterns = patterns or {}  # per-layer patterns of a non-uniform allocation
        self.row_scales = row_scales or {}  # BN-aware saliency
        self.statcorr = statcorr
        self.dense: DenseInputs | None = dense  # the dense network's layer inputs (asymmetric target)
        self.group = group  # torchrun's processes, or None
        self.sinks = sinks or {}  # intercept: per layer, the module its output offset goes to (intercept.py)
        self.modules = dict(model.named_modules())
        self.results: dict[str, LayerResult] = {}
        self.t = {"forward": 0.0, "hessian": 0.0, "cholesky": 0.0, "solve": 0.0, "bn_recalibration": 0.0}
        self.peak_stored_mb = None
        self.graphs: dict = {}  # CUDA graphs of the solver's column loop, shared by layers of the same shape
        self.batchnorm_after: dict[str, str] = {}  # layer → the BatchNorm whose statistics follow from its sums
        self.batch_ends: set[int] | None = None  # indices of the parts that end a calibration batch (cpu_batches)
        self.done: set[str] = set()  # layers pruned, BatchNorms re-estimated (a module called twice: at its first call)
        self.forward_clock = lambda: 0.0  # seconds of forward work done so far inside the executor
        self.partners: dict[str, SkipPartner] = {}  # residual target: per layer, the skip operand it is summed with
        self.gates: dict[str, ReluGate] = {}  # inactive weight: per layer, how its output reaches a ReLU
        self.outputs = lambda node, b: None  # the pruned graph's node outputs at the current barrier
        self.checkpoints: PruneCheckpoints | None = None  # where progress is saved now and then (resume.py)
        self.bar = tqdm(total=sum(1 for r in plan.values() if not r) + len(self.refits),
                        desc=f"{config.method} {config.pattern}", unit="layer", disable=not progress, leave=False)

    def sync(self):
        if next(self.model.parameters()).is_cuda:
            torch.cuda.synchronize()

    def needs(self, config: PruneConfig | None = None) -> str:
        """What a layer pruned with `config` (default: the run's) needs from its inputs: the Hessian, or only what the
        method's mask needs (NEEDS) when no re-fit or statistics correction reads H (GPTQ rounding does, but only
        SparseGPT has it, which needs H)."""
        config = config or self.config
        if self.dense is not None or config.refine != "none" or self.statcorr is not None:
            return "hessian"
        return NEEDS[config.method]

    def prune_layer(self, name: str, inputs: Iterable[torch.Tensor]) -> None:
        """inputs: the layer's input batches; iterated twice when the layer is pruned without a Hessian (the mask's
        statistics, then the reported error from the layer's outputs)."""
        module = self.modules[name]
        config = self.configs.get(name, self.config)
        needs = self.needs(config)
        dense_hessians = self.config.hessians == "dense"  # OBC's scheme: the layer sees only the dense network
        sink = self.sinks.get(name) if needs == "hessian" else None
        # the BatchNorm after the layer re-estimated from the layer's sums (not with dense Hessians: other inputs)
        bn = self.batchnorm_after.get(name) if needs == "hessian" and not dense_hessians else None
        partner = self.partners.get(name)  # (none without the dense target or with dense Hessians: run_fx)
        pruner = LayerPruner(module, name, hessian=needs == "hessian",
                             track_mean=self.statcorr is not None or sink is not None or bn is not None,
                             dense_target=self.dense is not None and not dense_hessians, keep_sums=bn is not None,
                             shifted_target=partner is not None, target_share=self.config.target_share,
                             inactive_weight=self.config.inactive_weight
                             if name in self.gates and gate_applies(config, module.weight) else None)
        scale = None if partner is None else inverse_scale(
            self.modules.get(partner.batchnorm), module.weight.shape[0], module.weight.device)
        f0, t0 = self.forward_clock(), time.perf_counter()
        d0 = self.dense.seconds if self.dense else 0.0
        dense = self.dense.stream(name) if self.dense else itertools.repeat(None)
        if needs != "nothing":
            for i, x in enumerate(inputs):  # with the fx executor, computing these is forward time, not Hessian time
                end = self.batch_ends is None or i in self.batch_ends  # the last part of a calibration batch
                if i == 0 and pruner.active is not None and not pruner.gate_affordable(x, GATE_FLOPS):
                    pruner.active = None  # per-row sums too costly here: the plain dense target
                if dense_hessians:
                    pruner.add_batch(next(dense), end=end)
                else:
                    xd = next(dense)
                    pruner.add_batch(x, xd, end=end, shift=self._shift(partner, scale, i, module),
                                     active=self._active(name, i, xd) if pruner.active is not None else None)
        dense_seconds = self.dense.seconds - d0 if self.dense else 0.0
        if self.dense:
            self.t["dense_target"] = self.t.get("dense_target", 0.0) + dense_seconds
        dist.reduce_statistics_(pruner, self.group)  # all ranks' inputs (torchrun); nothing without it
        self.sync()
        t1 = time.perf_counter()
        dense_weight = module.weight.detach().clone() if needs != "hessian" else None
        res = None
        if dist.is_main(self.group):  # one rank solves; the others receive its weights
            res = pruner.prune(config, self.patterns.get(name), stats=self.t, graphs=self.graphs,
                               row_scale=self.row_scales.get(name), intercept=sink is not None,
                               keep=self.plan[name] if name in self.refits else "")
            if res.offset is not None and sink is module:  # into the bias, which is broadcast with the weight
                fold_offset_(module, sink, res.offset)
            if self.statcorr is not None and not res.skipped:
                self.statcorr.layer(name, module, pruner)
        res = dist.broadcast_layer(module, res, self.group)
        if res.offset is not None and sink is not module:  # a BatchNorm's running mean, on every rank
            fold_offset_(module, sink, res.offset)
        self.sync()
        self.t["hessian"] += t1 - t0 - (self.forward_clock() - f0) - dense_seconds
        self.t["solve"] += time.perf_counter() - t1  # includes "cholesky"
        if bn is not None and bn not in self.done:
            self._batchnorm_from_sums(bn, pruner)
        if res.error_from == "outputs":  # every rank runs the layer on its share of the inputs
            f1, t2 = self.forward_clock(), time.perf_counter()
            res.error = output_error(pruner, dense_weight, inputs, self.group)
            self.t["output_error"] = self.t.get("output_error", 0.0) + time.perf_counter() - t2 - (
                self.forward_clock() - f1)
        if partner is not None and pruner.shift_batches:
            res.skip_fitted = partner.node
        res.seconds = time.perf_counter() - t0
        pruner.free()
        self.results[name] = res
        self.bar.update(1)
        self.bar.set_postfix_str(name)
        if self.checkpoints is not None:
            self.checkpoints.maybe_save(self.model, self.results, self.done, self.t)

    def _shift(self, partner: SkipPartner | None, scale: torch.Tensor | None, i: int, module: nn.Module):
        """δ of batch i for a layer that fits a residual sum (residual_target.py); None where either network's
        skip operand is not at hand."""
        if partner is None:
            return None
        pruned, dense = self.outputs(partner.node, i), self.dense.output(partner.node, i)
        if pruned is None or dense is None:
            return None
        return target_shift(dense, pruned, scale, isinstance(module, nn.Linear))

    def _active(self, name: str, i: int, dense: torch.Tensor | None) -> torch.Tensor | None:
        """Where the dense network's ReLU after layer `name` passes for batch i (relu_gate.py); None where the dense
        skip operand is not at hand (the batch then counts as all active)."""
        gate = self.gates[name]
        skip = self.dense.output(gate.skip, i) if gate.skip is not None else None
        if dense is None or (gate.skip is not None and skip is None):
            return None
        modules = self.dense.modules
        return dense_active(modules[name], modules.get(gate.batchnorm), dense, skip)

    def _batchnorm_from_sums(self, name: str, pruner: LayerPruner) -> None:
        """Re-estimate BatchNorm `name` from the pruned layer before it (output_moments): the statistics a pass over
        its inputs would give, up to float rounding, so the executor runs it as an ordinary node (ResNet-50 at 224²,
        1024 images: 10 s of statistics and a store of each conv's outputs for the whole set saved)."""
        t0 = time.perf_counter()
        moments = pruner.output_moments()
        if moments is None:
            return
        mean, var = moments
        n = max(pruner.nsamples, 2)
        set_statistics_(self.modules[name], mean, var * (n / (n - 1)), pruner.batches)
        self.done.add(name)
        self.t["bn_recalibration"] += time.perf_counter() - t0

    def run_fx(self, gm: fx.GraphModule, batches: list[torch.Tensor], recalibrate_bn: bool,
               low_memory: bool) -> float:
        done = self.done  # a module called twice is pruned or recalibrated at its first call

        def prune(name):
            def barrier(inputs):
                if name not in done:
                    done.add(name)
                    self.prune_layer(name, inputs)
            return barrier

        def recalibrate(name):
            def barrier(inputs):
                if name not in done:
                    done.add(name)
                    f0, t0 = self.forward_clock(), time.perf_counter()
                    bn_statistics_(self.modules[name], inputs, self.group)
                    if self.statcorr is not None:
                        self.statcorr.batchnorm(name, self.modules[name])
                    self.t["bn_recalibration"] += time.perf_counter() - t0 - (self.forward_clock() - f0)
            return barrier

        visited = [name for name, reason in self.plan.items() if not reason or name in self.refits]
        barriers = {name: prune(name) for name in visited}
        if recalibrate_bn:
            bns = set(bn_modules(self.model))
            barriers |= {name: recalibrate(name) for name, m in self.modules.items() if m in bns}
            if self.statcorr is None:  # (statistics correction reads each BatchNorm at its barrier)
                self.batchnorm_after = batchnorms_reading(gm, {n for n, reason in self.plan.items() if not reason})
        names = [name for name, reason in self.plan.items() if not reason]
        if self.dense is not None and self.config.residual_target and self.config.hessians != "dense":
            self.partners = skip_partners(gm, names)
        if self.dense is not None and self.config.inactive_weight < 1 and self.config.hessians != "dense":
            self.gates = relu_gates(gm, names)
        sums = [p.sum for p in self.partners.values()] + [g.sum for g in self.gates.values() if g.sum is not None]
        if self.dense is not None:  # in step with this graph, under the same memory policy
            if not self.dense.follow_graph(visited, low_memory, keep_until=sums):
                self.partners = {}
        # a BatchNorm already re-estimated from its layer's sums is no barrier: it runs with the nodes around it
        ex = GraphExecutor(gm, batches, barriers, low_memory, self.sync, skip=done.__contains__, keep_until=sums)
        self.outputs = ex.output
        self.forward_clock = lambda: ex.forward_seconds
        passes = ex.run()
        self.t["forward"] += ex.forward_seconds
        self.peak_stored_mb = ex.peak_stored_bytes / 2**20
        return passes

    def run_hooks(self, batches: list[torch.Tensor], order: list[str], recalibrate_bn: bool,
                  parts: list[str] = ()) -> float:
        """Fallback for untraceable models: one forward per layer, cut short right after that layer's input. With
        `parts` (submodules a partly traced graph called whole, its pass done): each part's inputs are stored in one
        pass cut short at the part, and its layers' inputs come from running the part alone on them."""
        passes = 0.0
        names = [n for n in order if not self.plan[n] and n not in self.results]  # (a resumed prune's done ones)
        steps = layer_inputs(self.model, names, batches, parts)  # (a part's layers pruned in turn from its inputs)
        while True:
            t0 = time.perf_counter()
            step = next(steps, None)
            self.t["forward"] += time.perf_counter() - t0
            if step is None:
                break
            name, captured, made = step
            passes += made
            self.prune_layer(name, captured)
            captured.clear()  # free the layer inputs before the next layer
        if recalibrate_bn and bn_modules(self.model):
            t0 = time.perf_counter()
            recalibrate(bn_modules(self.model), self.model, batches, self.group)  # summed over the processes
            if self.statcorr is not None:
                names = {m: n for n, m in self.model.named_modules()}
                for bn in bn_modules(self.model):
                    self.statcorr.batchnorm(names[bn], bn)
            self.t["bn_recalibration"] += time.perf_counter() - t0
            passes += 1
        return passes


def _with_overrides(config: PruneConfig, overrides: dict) -> PruneConfig:
    """config with prune_model's keywords as its fields; a keyword that is no field is a TypeError naming the
    nearest field (a typo would otherwise read as dataclasses' own message about __init__)."""
    fields = {f.name for f in dataclasses.fields(PruneConfig)}
    for key in overrides:
        if key not in fields:
            import difflib

            near = difflib.get_close_matches(key, sorted(fields), n=1)
            raise TypeError(f"prune_model got an unknown keyword '{key}': not a PruneConfig field"
                            + (f" (did you mean '{near[0]}'?)" if near else ""))
    return replace(config, **overrides) if overrides else config


@torch.no_grad()
def prune_model(model: nn.Module, calibration, config: PruneConfig | None = None, *, progress: bool = True,
                use_fx: bool = True, process_group=None, resume: str | Path | None = None,
                nsamples: int | None = None, **overrides) -> PruneReport:
    """Prune `model` in place, one-shot, as `config` says (default RECOMMENDED, the CLI's default recipe;
    PUBLISHED is SparseGPT as published), with any PruneConfig field given as a keyword overriding it:

        prune_model(model, images, nm="2:4")
        prune_model(model, images, PUBLISHED, method="magnitude", sparsity=0.5)

    calibration: a tensor of inputs (N, ...) or an iterable of batches (tensors or (x, y) pairs, e.g. a DataLoader);
    nsamples: how many of its images calibrate (default: a tensor's all, an iterable's first 1024). The config
    needs a pattern (sparsity or nm). use_fx: run the model as a traced graph where it can be traced (else one
    truncated forward pass per layer; same result); a torch.compile'd model is pruned through the module it wraps,
    whose names the report uses. process_group: the processes that share the calibration
    set (torchrun's, `dist.process_group()`); each passes its own images and all end with the same model. Without
    one nothing is distributed, even inside a job that has a process group. resume: a file where an unstructured
    or N:M prune saves its progress now and then (resume.py); started again with the same model, images and config
    it goes on from there, and the file goes when the prune ends (not under torchrun or with stat_correction). The
    report records the resolved config and what each layer got.
    """
    model = _module_to_prune(model)
    config = _with_overrides(config or RECOMMENDED, overrides)
    if idle := config.idle():  # (a typo'd recipe would otherwise look like a result of its own)
        warnings.warn(f"{'; '.join(idle)}: {'changes' if len(idle) == 1 else 'change'} nothing in this prune",
                      RuntimeWarning)
    param = next(model.parameters(), None)
    if param is None:
        raise UserError(f"{type(model).__name__} has no parameters: nothing to prune")
    config.check_runnable(dist.active(process_group), param.device)
    stages = [stage.resolved(dist.active(process_group)) for stage in config.stages]
    own = [stage.for_layers(dist.active(process_group)) for stage in config.stages]  # layer_patterns' configs
    config = config.resolved(dist.active(process_group))
    batches = _as_batches(calibration, param.device, config.batch_size, nsamples)
    reports = []
    with _as_conv2d(model, batches[0][:1]) as views:
        for stage, configs in zip(stages, own):  # channels, then the weights of the smaller network; or one of them
            reports.append(_prune_structured(model, batches, stage, progress, views) if stage.structure == "channels"
                           else _prune_weights(model, batches, stage, progress, use_fx, process_group, views, resume,
                                               configs))
    report = reports[-1]
    if len(reports) > 1:
        channels = reports[0]
        report = replace(report, config=config, structure=channels.structure, stages=[s.as_dict() for s in stages],
                         seconds=channels.seconds + report.seconds, timings={
                             **{f"channels_{k}": v for k, v in channels.timings.items()}, **report.timings})
    by_channels = _channel_layers(report.structure, views, model, config) if report.structure else None
    report.layers = [original_result(r, views) for r in report.layers] if by_channels is None or len(reports) > 1 \
        else by_channels
    report.total_sparsity = weight_sparsity(model)
    return report


def _module_to_prune(model) -> nn.Module:
    """The nn.Module whose layers a prune changes: a torch.compile'd model's own module (its layers' names are that
    module's); a TorchScript module (its convs are compiled code, not modules, so no layer would be found) or anything
    else is a one-line error."""
    model = as_module(model, "the model to prune")
    if isinstance(model, torch.jit.ScriptModule):
        raise UserError("a TorchScript module (torch.jit.script or torch.jit.trace) cannot be pruned: its layers are "
                        "compiled code, not Conv and Linear modules. Prune the nn.Module it was made from, then "
                        "script or trace that")
    return model


@torch.no_grad()
def channel_plan(model: nn.Module, example: torch.Tensor, ignore: Iterable[str] = ()) -> list[dict]:
    """What structure='channels' may remove from `model`, before any statistics: per dependency group (channels.py)
    its producers, channels, how many of them can go and, where none can, why; prune_model's own channel walk on
    `example` (one input or a few). ignore: layer names or regexes kept as they are (PruneConfig.ignore)."""
    model = _module_to_prune(model)
    if not torch.is_tensor(example):
        raise UserError(f"channel_plan's example must be a tensor of inputs (one or a few), got "
                        f"{type(example).__name__}")
    with _as_conv2d(model, example[:1]) as views:
        kept = nonstandard_layers(model, example[:1]) | ignored_layers(model, ignore, view_names(views))
        plan = [{"producers": g.producers, "channels": len(g.units) * g.width, "removable": len(g.removable) * g.width,
                 "reason": g.reason} for g in channel_groups(model, example[:1], nonstandard=kept)]
        return renamed(plan, views)


@contextlib.contextmanager
def _as_conv2d(model: nn.Module, example: torch.Tensor):
    """The block with `model` in eval mode (every submodule's own mode back after: BatchNorms frozen in training stay
    so) and its Conv1d, Conv3d and transposed convs as the Conv2d they equal (conv_views.py); yields the views.
    First the model runs on `example`: one that cannot (built for other inputs) is a one-line error, not a trace
    of the executor or of torch.fx's shape propagation around the model's own."""
    with evaluation_mode(model):
        out = forward_checked(model, example, f"the calibration inputs (shape {list(example.shape)})")
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in output_tensors(out)):
            raise UserError("the model's outputs on the calibration inputs are not finite (NaN or Inf): NaN weights "
                            "in its checkpoint, or half precision overflowing? Check it before pruning")
        positions: dict[str, int] = {}  # of the layers the views stand in for: their own multiply-adds
        if viewable(model):
            forward_order(model, example, positions=positions, kinds=VIEWABLE)
        with conv2d_views(model, positions) as views:
            yield views


def _prune_weights(model: nn.Module, batches: list[torch.Tensor], config: PruneConfig, progress: bool, use_fx: bool,
                   process_group, views: dict, resume: str | Path | None = None,
                   own: dict[str, PruneConfig] | None = None) -> PruneReport:
    """prune_model's unstructured and N:M prune, on a model in eval mode whose layers are Conv2d and Linear (views:
    the ConvViews standing in for the others, conv_views.py). own: per entry of config.layer_patterns, the resolved
    config of the layers it names (PruneConfig.for_layers)."""
    pattern = config.pattern
    device = batches[0].device
    nsamples = sum(len(x) for x in batches)
    if dist.active(process_group):  # this process's share of the images (dist.py)
        batches = dist.shard(batches, process_group)
        dist.broadcast_module_(model, process_group)
    t_start = time.perf_counter()
    checkpoints = PruneCheckpoints(resume, fingerprint(model, batches, config)) \
        if resume is not None and not dist.active(process_group) and not config.stat_correction else None
    input_bytes: dict[str, int] = {}
    positions: dict[str, int] = {}
    order = forward_order(model, batches[0][:1], input_bytes, positions)
    positions.update(view_positions(views))
    widest = max(input_bytes.values(), default=0)  # bytes of the widest layer input of one image
    fitted = cpu_batches(batches, widest) if device.type == "cpu" else batches
    low_memory = config.low_memory
    copies = 2 if config.dense_target or config.hessians == "dense" else 1  # (the dense copy run in step)
    if low_memory is None:
        low_memory, policy = memory_policy(widest, sum(len(x) for x in batches), device, copies=copies)
    else:
        policy = "low-memory" if low_memory else "default"
    # the one-pass executor's activations, layer after layer: freed memory reused, not faulted in afresh (heap.py)
    with reuse_freed_memory(device.type == "cpu" and not low_memory) as reused:
        if reused:
            policy += "; freed memory kept for reuse (glibc)"
        nonstandard = nonstandard_layers(model, batches[0][:1])
        unsupported = unsupported_layers(model)  # (the convs conv_views cannot stand in for)
        left = nonstandard | unsupported
        for reason in dict.fromkeys(left.values()):  # one line per reason (an NFNet has 57 such layers)
            named = [n for n, r in left.items() if r == reason]
            warnings.warn(f"{len(named)} layer{'s' * (len(named) > 1)} ({', '.join(named[:3])}"
                          f"{', ...' * (len(named) > 3)}): {reason} (report.json lists them)", RuntimeWarning)
        aliases = view_names(views)
        plan = choose_layers(model, order, config.ignore, not config.prune_all, nonstandard, aliases)
        names = [n for n in order if not plan[n]]
        patterned = patterned_layers(model, plan, config.layer_patterns, aliases)  # layer -> its entry's key
        main = [n for n in names if n not in patterned]  # the layers of the main pattern (and of an allocation)
        chunk = cpu_batch_images(widest) if device.type == "cpu" else None
        share = nm_dense_layers(config, model, fitted, main, positions, progress, chunk) \
            if pattern.is_nm and config.nm_share is not None and config.nm_share < 1 and main else None
        for n in share["dense"] if share else ():
            plan[n] = f"kept dense by nm_share {config.nm_share:g}: its {pattern} costs the most at the output"
        names, main = [n for n in names if not plan[n]], [n for n in main if not plan[n]]
        kept = nonstandard | {n: r for n, r in plan.items() if r == IGNORED}  # (their channels stay in order too)
        permutation = permute_for_nm_(model, fitted, main, pattern, progress, bool(config.permute), kept) \
            if config.permute is not False else {}
        t0 = time.perf_counter()
        row_scales = bn_row_scales(model) if config.bn_aware else {}
        bns = set(bn_modules(model))
        bn_names = [n for n, m in model.named_modules() if m in bns] if config.bn_recalibration else []
        statcorr = StatCorrection(model, batches, names, bn_names) if config.stat_correction else None
        alloc = allocate(config, model, fitted, main, positions, row_scales, progress, chunk) if not pattern.is_nm \
            else {"sparsity": {}} | ({"nm_share": share} if share else {})
        patterns = {n: Pattern(sparsity=v) for n, v in alloc["sparsity"].items()} if config.allocation != "uniform" \
            else {}
        patterns |= {n: layer_pattern(key, config.layer_patterns[key]) for n, key in patterned.items()}
        t_alloc = time.perf_counter() - t0
        dense_hessians = config.hessians == "dense"
        dense = DenseInputs(model, fitted) if config.dense_target or config.reconstruct or dense_hessians else None
        gm = None
        if use_fx:
            try:
                gm = trace(model)
            except Exception as e:
                gm = partial_trace(model, batches[0][:2])  # fx through all but the parts it cannot trace
                opaque = [n for n in getattr(gm, "opaque_modules", ()) if any(
                    not reason and opaque_part(m, [n]) for m, reason in plan.items())]
                if gm is None:
                    warnings.warn(f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}); "
                                  "falling back to one forward pass per layer", RuntimeWarning)
                elif opaque:
                    warnings.warn(f"torch.fx cannot trace {', '.join(opaque)} of {type(model).__name__}: called "
                                  "whole in the graph's pass, then their layers pruned from the inputs they get, "
                                  "stored in one more pass (one forward each with --low-memory or where they would "
                                  "not fit in memory)", RuntimeWarning)
        # the layers kept dense that are re-fitted: at barriers of the traced graph (BatchNorms re-estimated before)
        refits = [n for n in refit_layers(plan, order) if n not in nonstandard] if config.refit_dense_layers \
            and config.dense_target and config.hessians == "pruned" and gm is not None else []
        sinks = offset_sinks(model, names, gm, biases=False) | offset_sinks(model, refits, gm) if config.intercept \
            else {}  # gm: traced once for both; a re-fit dense layer's bias takes its offset
        run = _Pruner(model, plan, config, progress, patterns, row_scales, statcorr,
                      dense if config.dense_target or dense_hessians else None, process_group, sinks, refits,
                      {n: (own or {})[key] for n, key in patterned.items()})
        saved = checkpoints.load() if checkpoints is not None else None
        if saved is not None:  # the finished layers as they were: run as ordinary modules from here on
            model.load_state_dict(saved["model"])
            run.results, run.t = restored_results(saved), saved["timings"]
            run.done.update(saved["done"])
            if dense is not None:
                dense.served(run.results)
            run.bar.update(len(run.results))
            if progress:
                tqdm.write(f"resuming the prune: {len(run.results)} layers were done ({checkpoints.path})")
        run.checkpoints = checkpoints
        run.t["allocation_and_dense_pass"] = t_alloc
        run.batch_ends = part_ends(batches, fitted)
        if permutation:
            run.t["permutation"] = permutation["seconds"]
        passes = None
        if gm is not None:
            try:
                passes = run.run_fx(gm, fitted, config.bn_recalibration, low_memory)
            except GraphStop as e:
                warnings.warn(f"cannot run the traced graph ({e}); one forward pass per layer", RuntimeWarning)
        if passes is None:
            passes = run.run_hooks(fitted, order, config.bn_recalibration)
        elif any(not plan[n] and n not in run.results for n in order):  # inside what the graph calls as a whole
            parts = []
            if not low_memory:  # a part's stored inputs are activations of the whole calibration set
                parts, why = stored_parts(model, gm.opaque_modules, fitted[0][:1],
                                          sum(len(x) for x in batches), device, copies) \
                    if config.low_memory is None else (gm.opaque_modules, "")
                policy += f"; {why}" if why else ""
            if dense is not None:
                dense.parts = parts
            passes += run.run_hooks(fitted, order, config.bn_recalibration, parts)
        run.bar.close()
        if config.residual_target and not any(r.skip_fitted for r in run.results.values()):
            warnings.warn("residual_target: no layer fitted a residual sum (none on the traced graph, the model "
                          "could not be traced, or dense_target is off): pruned as without it", RuntimeWarning)
        if config.refit_dense_layers and not any(r.refitted for r in run.results.values()):
            warnings.warn("refit_dense_layers: no layer kept dense was re-fitted (none after a pruned layer, too few "
                          "calibration samples, the model could not be traced, dense_target off or hessians='dense'): "
                          "pruned as without it", RuntimeWarning)
        losses = []
        if config.reconstruct:
            t0 = time.perf_counter()
            masks = {f"{n}.weight": r.mask for n, r in run.results.items() if not r.skipped}
            losses = reconstruct_model(model, dense.model, batches, masks, config.reconstruct, progress=progress)
            if config.bn_recalibration and bn_modules(model):
                recalibrate(bn_modules(model), model, batches)
            run.t["reconstruct"] = time.perf_counter() - t0
        if dense is not None:
            dense.free()
        modules = dict(model.named_modules())
        layers = []
        for name, reason in plan.items():
            res = run.results.get(name)
            if res is None:
                w = modules[name].weight
                if not reason:  # planned, but no pass reached it: say so rather than report it as pruned-to-nothing
                    reason = "not reached by the prune's pass (called in a way the traced graph does not show)"
                    warnings.warn(f"{name}: {reason}; left as it is", RuntimeWarning)
                res = LayerResult(name, list(w.shape), config.method, str(pattern), skipped=True, reason=reason)
            layers.append(res)
        layers += [LayerResult(name, list(modules[name].weight.shape), config.method, str(pattern), skipped=True,
                               reason=reason) for name, reason in unsupported.items()]
        pruned = [r for r in layers if not r.skipped]
        if not pruned:
            warnings.warn("no layer was pruned: " + ("report.layers says why of each" if layers else
                          "the model has no Conv or Linear layer"), RuntimeWarning)
        n_pruned = sum(r.mask.numel() for r in pruned)
        report = PruneReport(config, nsamples, layers,
                             seconds=time.perf_counter() - t_start, forward_passes=passes, timings=run.t,
                             peak_stored_mb=run.peak_stored_mb, memory_policy=policy,
                             allocation={k: v for k, v in alloc.items() if k != "sparsity"} | {
                                 "kind": config.allocation, "budget": config.budget},
                             reconstruct={"epochs": config.reconstruct, "loss": losses} if config.reconstruct else {},
                             stat_corrected=statcorr.corrected if statcorr else [],
                             bn_recalibrated=config.bn_recalibration and bool(bn_modules(model)),
                             world_size=dist.world(process_group), permutation=permutation,
                             resumed_layers=len(saved["results"]) if saved is not None else 0)
        report.sparsity = sum((~r.mask).sum().item() for r in pruned) / n_pruned if n_pruned else 0.0
        if checkpoints is not None:
            checkpoints.finish()
        return report


def _prune_structured(model: nn.Module, batches: list[torch.Tensor], config: PruneConfig, progress: bool,
                      views: dict) -> PruneReport:
    """structure='channels' (one process, checked by check_runnable), on a model in eval mode: the model comes back
    physically smaller (structured.py)."""
    t0 = time.perf_counter()
    positions: dict[str, int] = {}
    input_bytes: dict[str, int] = {}
    forward_order(model, batches[0][:1], input_bytes, positions)
    positions.update(view_positions(views))
    low_memory, policy = config.low_memory, "low-memory" if config.low_memory else "default"
    if low_memory is None:  # (the dense target's pass: the dense copy's graph in step)
        low_memory, policy = memory_policy(max(input_bytes.values(), default=0), sum(len(x) for x in batches),
                                           batches[0].device, copies=2 if config.dense_target else 1)
    kept = ignored_layers(model, config.ignore, view_names(views))
    try:
        structure = prune_channels(model, batches, config, positions, progress, low_memory, kept)
    except torch.linalg.LinAlgError as e:  # (mild cases are solved at a raised damping, block_obs.damped_inverse)
        raise UserError(f"channel prune: a layer's calibration Hessian is not positive definite even with raised "
                        f"damping ({str(e).splitlines()[0]}); its inputs are probably all but zero: are the weights "
                        "before it trained?") from None
    return PruneReport(config, sum(len(x) for x in batches), [], seconds=time.perf_counter() - t0,
                       timings=structure.timings, structure=dataclasses.asdict(structure), memory_policy=policy,
                       bn_recalibrated=config.bn_recalibration and bool(bn_modules(model)))


def _channel_layers(structure: dict, views: dict, model: nn.Module, config: PruneConfig) -> list[LayerResult]:
    """A channel prune's per-layer results, named and shaped as the user's layers (a view conv's as its original's,
    restored by now), from the structure report, which this renames likewise."""
    weights = {n: list(m.weight.shape) for n, m in model.named_modules() if isinstance(m, VIEWABLE)}
    for r in structure["layers"]:
        if r["name"] in views:
            r["name"] = views[r["name"]][0]
            r["shape_before"], r["shape_after"] = views[f"{r['name']}.conv"][1].shape, weights[r["name"]]
    structure.update(renamed({k: v for k, v in structure.items() if k != "layers"}, views))
    structure["spec"] = {n: spec_entry(model, n) for n in structure["spec"]}
    return [LayerResult(r["name"], r["shape_after"], config.method, "channels", skipped=True,
                        reason="" if r["shape_before"] == r["shape_after"] else
                        "channels: " + " -> ".join("x".join(map(str, r[k])) for k in ("shape_before", "shape_after")))
            for r in structure["layers"]]


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over all Linear and conv layers (1-D, 2-D, 3-D, transposed)."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, (*PRUNABLE, *VIEWABLE)):
            zeros += (m.weight == 0).sum().item()
            total += m.weight.numel()
    return zeros / total if total else 0.0
