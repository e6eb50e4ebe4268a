"""The model-level driver: sequential one-shot pruning of every Conv2d and Linear of any nn.Module.

The calibration set goes through the network once. With a torch.fx trace the graph is run node by
node over all calibration batches (graph.py): when a layer is reached its Hessian is complete, so it is
pruned before its output is computed, and every later layer sees the already-pruned network (layers that
read the same tensor, such as a residual block's conv1 and downsample, share it). BatchNorm is
re-estimated the same way, from the pruned network's activations. Models fx cannot trace fall back to
one (truncated) forward pass per layer.
"""
from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from . import dist
from .allocation import allocate
from .batchnorm import bn_modules, bn_statistics_, recalibrate
from .dense_target import DenseInputs
from .graph import PRUNABLE, GraphExecutor, GraphStop, inputs_of, memory_policy
from .layer import LayerPruner, LayerResult, output_error
from .layer_plan import choose_layers, forward_order
from .masks import Pattern
from .quant import BITS, CLIP, QUANT
from .reconstruct import reconstruct as reconstruct_model
from .refine import REFINE
from .saliency import bn_row_scales
from .solver import METHODS, NEEDS
from .statcorr import StatCorrection
from .utils import UserError


@dataclass
class PruneReport:
    method: str
    pattern: str
    nsamples: int
    layers: list[LayerResult]
    seconds: float = 0.0  # pruning wall time, evaluation excluded
    sparsity: float = 0.0  # over the pruned layers
    total_sparsity: float = 0.0  # over all Conv2d/Linear weights
    forward_passes: float = 0.0  # full calibration passes spent (the fx path needs 1; low_memory a few)
    peak_stored_mb: float | None = None  # most activations of the calibration set held at once (fx path)
    memory_policy: str = ""  # default or low-memory, and why (chosen by free memory unless asked)
    allocation: dict = field(default_factory=dict)  # kind, budget and (dp) the error database; layers hold sparsities
    bn_aware: bool = False  # rows' saliency weighted by a following BatchNorm's (γ/σ)²
    refine: str = "none"  # the layer solve's refinement (refine.py)
    dense_target: bool = False  # layers fit to the dense network's outputs (dense_target.py)
    reconstruct: dict = field(default_factory=dict)  # epochs and loss per epoch of the global reconstruction
    wbits: int | None = None  # weight bits (quant.py); None = float weights
    quant: str = ""  # gptq (in the solver's loop) or rtn (after it), with wbits
    quant_clip: str = ""  # minmax or mse grids, with wbits
    stat_corrected: list = field(default_factory=list)  # layers and BatchNorms given the dense output statistics
    timings: dict = field(default_factory=dict)  # seconds per phase
    world_size: int = 1  # processes that shared the calibration set (torchrun)
    bn_recalibrated: bool = False

    @property
    def quantized(self) -> dict[str, dict]:
        """Parameter name → integer codes (weight's shape), scale and zero point per output channel, bits."""
        return {f"{r.name}.weight": r.quant for r in self.layers if r.quant is not None}

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name → boolean mask (True = kept), for the layers that were pruned."""
        return {f"{r.name}.weight": r.mask.cpu() for r in self.layers if not r.skipped and r.mask is not None}

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "layers"}
        d["layers"] = [r.as_dict() for r in self.layers]
        return d


def _as_batches(calibration, device: torch.device, batch_size: int) -> list[torch.Tensor]:
    if isinstance(calibration, torch.Tensor):
        calibration = calibration.split(batch_size)
    batches = []
    for b in calibration:
        x = b[0] if isinstance(b, (tuple, list)) else b
        batches.append(x.to(device))
    if not batches or sum(len(x) for x in batches) == 0:
        raise UserError("the calibration set is empty: give at least one image")
    return batches


class _Pruner:
    """Holds the run's settings and the per-layer results; the two executors call `prune_layer`."""

    def __init__(self, model, plan, method, pattern, percdamp, blocksize, progress, patterns=None, row_scales=None,
                 statcorr=None, refine="none", dense=None, wbits=None, quant="gptq", quant_clip="minmax"):
        self.model, self.plan, self.method, self.pattern = model, plan, method, pattern
        self.patterns = patterns or {}  # per-layer patterns of a non-uniform allocation
        self.row_scales = row_scales or {}  # BN-aware saliency
        self.statcorr, self.refine = statcorr, refine
        self.wbits, self.quant, self.quant_clip = wbits, quant, quant_clip  # joint quantization (quant.py)
        self.dense: DenseInputs | None = dense  # the dense network's layer inputs (asymmetric target)
        self.percdamp, self.blocksize = percdamp, blocksize
        self.modules = dict(model.named_modules())
        self.results: dict[str, LayerResult] = {}
        self.t = {"forward": 0.0, "hessian": 0.0, "cholesky": 0.0, "solve": 0.0, "bn_recalibration": 0.0}
        self.peak_stored_mb = None
        self.graphs: dict = {}  # CUDA graphs of the solver's column loop, shared by layers of the same shape
        self.forward_clock = lambda: 0.0  # seconds of forward work done so far inside the executor
        self.bar = tqdm(total=sum(1 for r in plan.values() if not r), desc=f"{method} {pattern}",
                        unit="layer", disable=not progress, leave=False)

    def sync(self):
        if next(self.model.parameters()).is_cuda:
            torch.cuda.synchronize()

    def needs(self, name: str) -> str:
        """What layer `name` needs from its inputs: the Hessian, or only what the method's mask needs (NEEDS), when
        no re-fit, statistics correction or GPTQ rounding reads H."""
        if self.dense is not None or self.refine != "none" or self.statcorr is not None:
            return "hessian"
        return NEEDS[self.method]

    def prune_layer(self, name: str, inputs: Iterable[torch.Tensor]) -> None:
        """inputs: the layer's input batches; iterated twice when the layer is pruned without a Hessian (the mask's
        statistics, then the reported error from the layer's outputs)."""
        module = self.modules[name]
        needs = self.needs(name)
        pruner = LayerPruner(module, name, hessian=needs == "hessian", track_mean=self.statcorr is not None,
                             dense_target=self.dense is not None)
        f0, t0 = self.forward_clock(), time.perf_counter()
        d0 = self.dense.seconds if self.dense else 0.0
        dense = self.dense.stream(name) if self.dense else itertools.repeat(None)
        if needs != "nothing":
            for x in inputs:  # with the fx executor, computing these is forward time, not Hessian time
                pruner.add_batch(x, next(dense))
        dense_seconds = self.dense.seconds - d0 if self.dense else 0.0
        if self.dense:
            self.t["dense_target"] = self.t.get("dense_target", 0.0) + dense_seconds
        dist.reduce_statistics_(pruner)  # all ranks' inputs (torchrun); nothing without it
        self.sync()
        t1 = time.perf_counter()
        dense_weight = module.weight.detach().clone() if needs != "hessian" else None
        res = None
        if dist.is_main():  # one rank solves; the others receive its weights
            res = pruner.prune(self.method, self.patterns.get(name, self.pattern), self.percdamp, self.blocksize,
                               stats=self.t, graphs=self.graphs, row_scale=self.row_scales.get(name),
                               refine=self.refine, wbits=self.wbits, quant=self.quant,
                               quant_clip=self.quant_clip)
            if self.statcorr is not None and not res.skipped:
                self.statcorr.layer(name, module, pruner)
        res = dist.broadcast_layer(module, res)
        self.sync()
        self.t["hessian"] += t1 - t0 - (self.forward_clock() - f0) - dense_seconds
        self.t["solve"] += time.perf_counter() - t1  # includes "cholesky"
        if res.error_from == "outputs":  # every rank runs the layer on its share of the inputs
            f1, t2 = self.forward_clock(), time.perf_counter()
            res.error = output_error(pruner, dense_weight, inputs)
            self.t["output_error"] = self.t.get("output_error", 0.0) + time.perf_counter() - t2 - (
                self.forward_clock() - f1)
        res.seconds = time.perf_counter() - t0
        pruner.free()
        self.results[name] = res
        self.bar.update(1)
        self.bar.set_postfix_str(name)

    def run_fx(self, gm: fx.GraphModule, batches: list[torch.Tensor], recalibrate_bn: bool,
               low_memory: bool) -> float:
        done = set()  # a module called twice is pruned or recalibrated at its first call

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
                    bn_statistics_(self.modules[name], inputs)
                    if self.statcorr is not None:
                        self.statcorr.batchnorm(name, self.modules[name])
                    self.t["bn_recalibration"] += time.perf_counter() - t0 - (self.forward_clock() - f0)
            return barrier

        barriers = {name: prune(name) for name, reason in self.plan.items() if not reason}
        if recalibrate_bn:
            bns = set(bn_modules(self.model))
            barriers |= {name: recalibrate(name) for name, m in self.modules.items() if m in bns}
        if self.dense is not None and not low_memory:  # low memory: no room for the dense activations too
            self.dense.follow_graph([name for name, reason in self.plan.items() if not reason])
        ex = GraphExecutor(gm, batches, barriers, low_memory, self.sync)
        self.forward_clock = lambda: ex.forward_seconds
        passes = ex.run()
        self.t["forward"] += ex.forward_seconds
        self.peak_stored_mb = ex.peak_stored_bytes / 2**20
        return passes

    def run_hooks(self, batches: list[torch.Tensor], order: list[str], recalibrate_bn: bool) -> float:
        """Fallback for untraceable models: one forward per layer, cut short right after that layer's input."""
        passes = 0.0
        for name in order:
            if self.plan[name]:
                continue
            t0 = time.perf_counter()
            captured = list(inputs_of(self.model, self.modules[name], batches))
            self.t["forward"] += time.perf_counter() - t0
            passes += 1
            self.prune_layer(name, captured)
            captured.clear()  # free the layer inputs before the next layer
        if recalibrate_bn and bn_modules(self.model):
            t0 = time.perf_counter()
            recalibrate(bn_modules(self.model), self.model, batches)  # summed over ranks under torchrun
            if self.statcorr is not None:
                names = {m: n for n, m in self.model.named_modules()}
                for bn in bn_modules(self.model):
                    self.statcorr.batchnorm(names[bn], bn)
            self.t["bn_recalibration"] += time.perf_counter() - t0
            passes += 1
        return passes


def check_combination(method: str, pattern: Pattern, *, allocation: str = "uniform", refine: str = "none",
                      wbits: int | None = None, quant: str = "gptq", quant_clip: str = "minmax", reconstruct: int = 0,
                      stat_correction: bool = False) -> None:
    """Every choice known and every combination supported, before any work (loading data, measuring accuracy)."""
    if method not in METHODS:
        raise UserError(f"unknown method '{method}'; choose from {', '.join(METHODS)}")
    if refine not in REFINE:
        raise UserError(f"unknown refinement '{refine}'; choose from {', '.join(REFINE)}")
    if wbits is not None:
        if wbits not in BITS or quant not in QUANT or quant_clip not in CLIP:
            raise UserError(f"--wbits must be one of {', '.join(map(str, BITS))}, --quant one of "
                            f"{', '.join(QUANT)} and --quant-clip one of {', '.join(CLIP)}; got {wbits}, {quant} "
                            f"and {quant_clip}")
        if refine != "none" or reconstruct:
            raise UserError("--refine and --reconstruct move the kept weights off their quantization grids: "
                            "not combinable with --wbits yet")
    if pattern.is_nm and allocation != "uniform":
        raise UserError(f"--allocation {allocation} chooses unstructured sparsities per layer; N:M is uniform by "
                        "definition: use --sparsity with it")
    if dist.active() and (allocation != "uniform" or stat_correction or reconstruct):
        raise UserError("--allocation owl/dp, --stat-correction and --reconstruct need the whole calibration "
                        "set in one process: run them without torchrun")


@torch.no_grad()
def prune_model(model: nn.Module, calibration, method: str = "sparsegpt", sparsity: float | None = None,
                nm: str | None = None, *, percdamp: float = 0.01, blocksize: int = 128, ignore: Iterable[str] = (),
                skip_first_last: bool = True, recalibrate_bn: bool = True, batch_size: int = 128,
                progress: bool = True, use_fx: bool = True, low_memory: bool | None = None,
                allocation: str = "uniform", budget: str = "params", owl_lambda: float = 0.1, dp_measure: str = "layer",
                bn_aware: bool = False, stat_correction: bool = False, refine: str = "none",
                dense_target: bool = False, reconstruct: int = 0, wbits: int | None = None,
                quant: str = "gptq", quant_clip: str = "minmax") -> PruneReport:
    """Prune `model` in place, one-shot, and return a report with per-layer results and masks.

    calibration: a tensor of inputs (N, ...) or an iterable of batches (tensors or (x, y) pairs).
    Give the pattern as `sparsity` (unstructured, in [0, 1)) or `nm` ('2:4'); a Pattern works too.
    low_memory: keep about one activation of the calibration set alive instead of two, by recomputing
    inside residual blocks (a few forward passes instead of one; same result). None (default) chooses by
    the free memory of the device (see `memory_policy`); the choice is in the report.
    allocation: uniform | owl | dp, per-layer sparsities with `sparsity` as the overall fraction of the
    budget (`params` or `flops`) removed (allocation.py); unstructured only. bn_aware: weigh each row's
    saliency by a following BatchNorm's (γ/σ)² (saliency.py). stat_correction: match the dense network's
    per-channel output statistics after pruning (statcorr.py). refine: none | cg | admm, a better layer solve
    after the method's (refine.py). dense_target: fit each layer to the dense network's output on its pruned
    inputs (dense_target.py; one more forward pass of a frozen dense copy, or about half a pass per layer in
    low-memory and untraceable runs). The CLI's default recipe sets dense_target and refine='cg' (config.RECIPES);
    this function's defaults are the published method's. reconstruct: epochs of Adam on the
    kept weights towards the dense layer outputs after the prune (reconstruct.py; no longer one-shot).
    wbits: kept weights on per-channel grids of 2^wbits levels, rounded inside SparseGPT's loop (quant 'gptq')
    or to nearest after the prune ('rtn'); the codes are in the report's `quantized` (quant.py). quant_clip:
    each channel's grid spans its weights (minmax) or the clipped range of least squared rounding error (mse).
    """
    pattern = sparsity if isinstance(sparsity, Pattern) else Pattern.parse(sparsity, nm)
    check_combination(method, pattern, allocation=allocation, refine=refine, wbits=wbits, quant=quant,
                      quant_clip=quant_clip, reconstruct=reconstruct, stat_correction=stat_correction)
    device = next(model.parameters()).device
    batches = _as_batches(calibration, device, batch_size)
    nsamples = sum(len(x) for x in batches)
    if dist.active():  # torchrun: this rank's share of the batches (dist.py)
        batches = dist.shard(batches)
        dist.broadcast_module_(model)
    was_training = model.training
    model.eval()
    t_start = time.perf_counter()
    input_bytes: dict[str, int] = {}
    positions: dict[str, int] = {}
    order = forward_order(model, batches[0][:1], input_bytes, positions)
    if low_memory is None:
        low_memory, policy = memory_policy(max(input_bytes.values(), default=0), sum(len(x) for x in batches), device,
                                           copies=2 if dense_target else 1)
    else:
        policy = "low-memory" if low_memory else "default"
    plan = choose_layers(model, order, ignore, skip_first_last)
    names = [n for n in order if not plan[n]]
    t0 = time.perf_counter()
    row_scales = bn_row_scales(model) if bn_aware else {}
    bns = set(bn_modules(model))
    bn_names = [n for n, m in model.named_modules() if m in bns] if recalibrate_bn else []
    statcorr = StatCorrection(model, batches, names, bn_names) if stat_correction else None
    alloc = allocate(allocation, model, batches, names, pattern.target, method, budget, positions, percdamp,
                     row_scales, owl_lambda, dp_measure, progress) if not pattern.is_nm else {"sparsity": {}}
    patterns = {n: Pattern(sparsity=v) for n, v in alloc["sparsity"].items()} if allocation != "uniform" else {}
    t_alloc = time.perf_counter() - t0
    dense = DenseInputs(model, batches) if dense_target or reconstruct else None  # the frozen dense model
    run = _Pruner(model, plan, method, pattern, percdamp, blocksize, progress, patterns, row_scales, statcorr,
                  refine, dense if dense_target else None, wbits, quant, quant_clip)
    run.t["allocation_and_dense_pass"] = t_alloc
    passes = None
    if use_fx:
        try:
            gm = fx.symbolic_trace(model)
        except Exception as e:
            warnings.warn(f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}); "
                          "falling back to one forward pass per layer", RuntimeWarning)
        else:
            try:
                passes = run.run_fx(gm, batches, recalibrate_bn, low_memory)
            except GraphStop as e:
                warnings.warn(f"cannot run the traced graph ({e}); one forward pass per layer", RuntimeWarning)
    if passes is None:
        passes = run.run_hooks(batches, order, recalibrate_bn)
    run.bar.close()
    losses = []
    if reconstruct:
        t0 = time.perf_counter()
        masks = {f"{n}.weight": r.mask for n, r in run.results.items() if not r.skipped}
        losses = reconstruct_model(model, dense.model, batches, masks, reconstruct, progress=progress)
        if recalibrate_bn and bn_modules(model):
            recalibrate(bn_modules(model), model, batches)
        run.t["reconstruct"] = time.perf_counter() - t0
    if dense is not None:
        dense.free()
    model.train(was_training)
    modules = dict(model.named_modules())
    layers = []
    for name, reason in plan.items():
        res = run.results.get(name)
        if res is None:
            w = modules[name].weight
            res = LayerResult(name, list(w.shape), method, str(pattern), skipped=True, reason=reason)
        layers.append(res)
    pruned = [r for r in layers if not r.skipped]
    n_pruned = sum(r.mask.numel() for r in pruned)
    report = PruneReport(method, str(pattern), nsamples, layers,
                         seconds=time.perf_counter() - t_start, forward_passes=passes, timings=run.t,
                         peak_stored_mb=run.peak_stored_mb, memory_policy=policy,
                         allocation={k: v for k, v in alloc.items() if k != "sparsity"} | {"kind": allocation,
                                                                                           "budget": budget},
                         bn_aware=bool(row_scales), refine=refine, dense_target=dense_target, wbits=wbits,
                         quant=quant if wbits else "", quant_clip=quant_clip if wbits else "",
                         reconstruct={"epochs": reconstruct, "loss": losses} if reconstruct else {},
                         stat_corrected=statcorr.corrected if statcorr else [],
                         bn_recalibrated=recalibrate_bn and bool(bn_modules(model)), world_size=dist.world())
    report.sparsity = sum((~r.mask).sum().item() for r in pruned) / n_pruned if n_pruned else 0.0
    report.total_sparsity = weight_sparsity(model)
    return report


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over all Conv2d and Linear layers."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, PRUNABLE):
            zeros += (m.weight == 0).sum().item()
            total += m.weight.numel()
    return zeros / total if total else 0.0
