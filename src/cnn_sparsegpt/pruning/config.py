"""The settings of a prune, in one frozen, self-checking object (`PruneConfig`): each field's default, help,
choices and range live here and nowhere else. The CLI flags and YAML keys are built from its fields (and from
those of `commands.options.PruneOptions`, the run around it: model, data, output).

    from cnn_sparsegpt import prune_model, RECOMMENDED, PUBLISHED
    prune_model(model, images, RECOMMENDED, nm="2:4")          # the default recipe; keywords override fields
    prune_model(model, images, PUBLISHED, method="magnitude", sparsity=0.5)
"""
from __future__ import annotations

import re
import typing
from dataclasses import MISSING, dataclass, field, fields, replace

import torch

from .allocation import ALLOCATIONS, BUDGETS, DP_MEASURES
from .channel_costs import CHANNEL_COSTS
from ..deploy.runtimes import RUNTIMES, runtime
from ..kernels.masks import Pattern
from ..kernels.quant import BITS, CLIP, QUANT
from ..kernels.refine import REFINE, SWAP_BUDGET
from ..kernels.fused_block import unavailable as fused_unavailable
from ..kernels.solver import COLUMN_LOOPS, EXACT_BUDGET, METHODS, SOLVERS
from ..utils import UserError


def opt(default, help: str, choices: tuple | None = None, check=None, want: str = "", pairs: str = ""):
    """A field with what the CLI and the checks need: help text, choices, and a range check (value -> bool) with
    what it wants, e.g. 'at least 1'. pairs: a mapping whose keys are any text (names, regexes), given on the command
    line as KEY=VALUE with this metavar, VALUE kept as text."""
    meta = {"help": help, "choices": choices, "check": check, "want": want, "pairs": pairs}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _auto(text: str) -> str:
    return f"auto (default): {text}"


def type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (list, tuple):
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    return isinstance(value, hint)


def type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check_fields(obj, where: str, skip: tuple = ()) -> None:
    """Types, choices and ranges of a dataclass instance's fields, each failure one line naming the field."""
    hints = typing.get_type_hints(type(obj))
    prefix = f"{where}: " if where else ""
    for f in fields(obj):
        if f.name in skip or f.name in ("sparsity", "nm"):  # the pattern is parsed, with its own messages
            continue
        value, meta = getattr(obj, f.name), f.metadata
        if not type_ok(value, hints[f.name]):
            raise UserError(f"{prefix}'{f.name}' must be {type_name(hints[f.name])}, got {value!r}")
        choices = meta.get("choices")
        if choices and value is not None and value not in choices:
            raise UserError(f"{prefix}unknown {f.name} '{value}'; choose from {', '.join(map(str, choices))}")
        if meta.get("check") and value is not None and not meta["check"](value):
            raise UserError(f"{prefix}{f.name} must be {meta['want']}, got {value}")


def layer_pattern(key, value) -> Pattern:
    """One entry of layer_patterns as a Pattern: a sparsity in [0, 1) (0.9, '0.9') or N:M ('2:4'); else one line."""
    try:
        return Pattern.parse(nm=value) if isinstance(value, str) and ":" in value else Pattern.parse(sparsity=value)
    except UserError:
        raise UserError(f"layer_patterns: '{key}' has pattern {value!r}: give a sparsity in [0, 1) (e.g. 0.9) or "
                        "N:M (e.g. 2:4)") from None


@dataclass(frozen=True)
class PruneConfig:
    """What a prune does to a model. The defaults are the recommended recipe (RECOMMENDED); PUBLISHED is
    SparseGPT's layer solve as in the paper. 'auto' fields are resolved by `resolved()` (the report holds that)."""
    method: str = opt("sparsegpt", "how each layer's mask is chosen: sparsegpt (OBS, with weight updates), "
                      "magnitude or wanda", METHODS)
    sparsity: float | None = opt(None, "unstructured: fraction of weights pruned per layer, in [0, 1)")
    nm: str | None = opt(None, "N:M semi-structured: keep N of every M input channels, e.g. 2:4")
    solver: str = opt("auto", "method sparsegpt's OBS solver: sparsegpt (one column sweep for all rows, lazy "
                      "updates), exact (OBC's ExactOBS: each row's cheapest weight removed one at a time with exact "
                      "inverse-Hessian updates; rows·d³ work) or auto (exact where a layer's rows·d³ is at most "
                      f"{EXACT_BUDGET:.0e}, about 5 s of a 2-core CPU; sparsegpt elsewhere and with wbits)", SOLVERS)
    hessians: str = opt("pruned", "where each layer's Hessian comes from: pruned (its inputs in the network "
                        "pruned so far, SparseGPT's sequential scheme) or dense (its inputs in the dense network, "
                        "OBC's one-pass scheme; the layer then fits the dense outputs on dense inputs, so "
                        "dense_target changes nothing)", ("pruned", "dense"))
    percdamp: float | None = opt(None, "Hessian damping relative to its mean diagonal. Default: 0.01 for weight masks "
                                 "(SparseGPT's), 0.001 for channels (their least-squares re-fits have far more "
                                 "calibration columns than inputs; chosen on held-out images, docs/CHANNELS.md)",
                                 check=lambda v: v >= 0, want=">= 0")
    blocksize: int = opt(128, "columns per lazy-update block of SparseGPT", check=lambda v: v >= 1,
                         want="at least 1")
    column_loop: str = opt("auto", "how SparseGPT's column loop over a block runs: loop (torch ops per column), "
                           "cuda_graph (that loop replayed as a CUDA graph), triton (one fused kernel per block; "
                           "CUDA and the triton package; quantized layers keep the loop) or auto (cuda_graph on a "
                           "GPU, loop elsewhere). The masks are the same up to float rounding", COLUMN_LOOPS)
    ignore: tuple = opt((), "layer names or regexes to keep as they are (dense; with channels, their input and "
                        "output channels stay too)")
    nm_share: float | None = opt(None, "N:M: the share of the pruned layers' weights (of their multiply-adds with "
                                 "budget 'flops') that take the pattern, in (0, 1]; the layers whose N:M costs the "
                                 "most at the network's output (its KL with only that layer pruned, one partial "
                                 "forward pass each) stay dense (not set: every pruned layer takes it)",
                                 check=lambda v: 0 < v <= 1, want="in (0, 1]")
    layer_patterns: dict = opt({}, "per-layer patterns, {layer name or regex: sparsity or N:M}, e.g. "
                               "{'layer4\\..*': 0.9, 'fc': '2:4'} (CLI: NAME=PATTERN ...): the first that matches "
                               "a layer is its pattern; the other pruned layers take sparsity or nm (an allocation "
                               "spreads the sparsity over those only). The ignore list and the layers kept dense by "
                               "convention stay dense", pairs="NAME=PATTERN")
    prune_all: bool = opt(False, "also prune the first conv and the last linear (kept dense by default)")
    bn_recalibration: bool = opt(True, "re-estimate BatchNorm statistics on the pruned network")
    batch_size: int = opt(128, "calibration (and evaluation) batch size; on a CPU, calibration batches are split "
                          "further where a layer's input would exceed 128 MB (faster; the same result up to rounding)",
                          check=lambda v: v >= 1, want="at least 1")
    low_memory: bool | None = opt(None, "hold about one activation of the calibration set at a time instead of two, "
                                  "recomputing inside residual blocks (~2.5 forward passes instead of 1; same "
                                  "result). Default: chosen by free memory, named in the report")
    allocation: str = opt("auto", "per-layer sparsities for an unstructured sparsity (the overall fraction stays "
                          "S): uniform (as published), owl (outlier-weighted, S ± owl_lambda), dp (per-layer error "
                          "database + knapsack; 2-4x a uniform prune's time on a CPU) or " +
                          _auto("dp for method sparsegpt at an unstructured sparsity without wbits, in one process "
                                "(chosen on held-out images, docs/RESULTS.md); uniform for N:M, channels, magnitude, "
                                "wanda, wbits and under torchrun"), ("auto",) + ALLOCATIONS)
    budget: str = opt("params", "what sparsity counts under a non-uniform allocation: weights or multiply-adds",
                      BUDGETS)
    owl_lambda: float = opt(0.1, "owl: layer sparsities within S ± this", check=lambda v: 0 <= v < 1,
                            want="in [0, 1)")
    dp_measure: str = opt("kl", "dp: each layer's error is its reconstruction error (layer), or that scaled so "
                          "that at S it equals the network's output KL with only that layer pruned on 256 "
                          "calibration images (kl: one forward pass per layer; better with this recipe, the layer "
                          "measure with the published one, docs/RESULTS.md)", DP_MEASURES)
    outputs: str = opt("scores", "what the model returns, for the measures at its output (dp_measure and "
                       "channel_costs kl): scores (class scores: a classifier's logits, a segmentation map's per-pixel "
                       "scores; KL between their softmaxes over dim 1) or values (anything else: an image, a depth "
                       "map, features; relative squared error of every output tensor)", ("scores", "values"))
    bn_aware: bool = opt(False, "weigh each output row's saliency by its BatchNorm's (gamma/sigma)^2, as if folded "
                         "(unstructured sparsegpt and magnitude)")
    stat_correction: bool = opt(False, "after pruning, give layers with a bias and BatchNorms the dense network's "
                                "per-channel output mean and variance on the calibration images")
    refine: str = opt("auto", "after each layer's solve: none (as published), cg (re-solve the kept weights on the "
                      "final mask by conjugate gradient), admm (also move the mask layer-wide, then cg; several times "
                      "slower on wide layers), swap (also move the mask by exact OBS swaps within each row, then solve "
                      f"the kept weights exactly; on layers of rows·d³ up to {SWAP_BUDGET:.0e}, cg beyond) or " +
                      _auto("swap for method sparsegpt at N:M (with permute: chosen on ten held-out seeds at 2:4 "
                            "and 4:8, docs/RESULTS.md), cg elsewhere and with inactive_weight below 1, none with "
                            "wbits, whose grids a re-solve would leave"),
                      ("auto",) + REFINE)
    dense_target: bool = opt(True, "fit each layer to the dense network's output on the pruned network's inputs "
                             "(min |W X_dense - W' X_pruned|^2: corrects upstream error); off: fit W X_pruned, as "
                             "published")
    target_share: float = opt(1.0, "with dense_target: the share of the dense network's correction each layer "
                              "fits: its target is W X_pruned + share * W (X_dense - X_pruned) (1: the dense output; "
                              "0: its own dense weights on the pruned inputs, as published)",
                              check=lambda v: 0 <= v <= 2, want="in [0, 2]")
    residual_target: bool = opt(False, "with dense_target: a layer whose output (through its BatchNorm) is added "
                                "to a skip branch computed before it fits the dense sum, correcting that branch's "
                                "error too (residual blocks' last conv or projection shortcut; traced models)")
    inactive_weight: float = opt(1.0, "with dense_target: the weight of outputs the dense network's next ReLU "
                                 "zeroes in each layer's fit (1: all count alike; below 1, each output channel gets "
                                 "its own Hessian, on layers the exact solver takes and whose per-row sums cost at "
                                 "most 2e9 multiply-adds per image: ResNet-20's, not ResNet-18's; traced models; 0.1 "
                                 "gained 1.8 points at 90% on ResNet-20, docs/RESULTS.md)",
                                 check=lambda v: 0 <= v <= 1, want="in [0, 1]")
    refit_dense_layers: bool = opt(False, "with dense_target: also re-fit the layers kept dense (first conv, last "
                                   "linear, the ignore list) that come after a pruned one, all weights kept: least "
                                   "squares to the dense network's outputs on the pruned network's inputs (with the "
                                   "intercept, a bias takes the offset); traced models")
    intercept: bool = opt(True, "fit each layer with an intercept where its output offset is free: the solve works "
                          "on centred inputs where a BatchNorm alone reads the layer (channel re-fits: or it has a "
                          "bias), so no weight is spent on the mean output, and its change goes into the BatchNorm's "
                          "running mean (or the bias); off: as published")
    reconstruct: int = opt(0, "after the prune, epochs of Adam (lr 1e-4) over the calibration images that move the "
                           "kept weights towards the dense network's layer outputs, masks fixed (not one-shot any "
                           "more)", check=lambda v: v >= 0, want=">= 0")
    wbits: int | None = opt(None, "also quantize the kept weights: an asymmetric grid of 2^B levels per output "
                            "channel (writes quant.pt beside the dequantized model.pt). Default: float weights",
                            BITS)
    quant: str = opt("auto", "with wbits: gptq (round inside SparseGPT's column loop, errors compensated), rtn "
                     "(round to nearest after pruning) or " + _auto("gptq for sparsegpt, rtn for the other methods"),
                     ("auto",) + QUANT)
    structure: str = opt("none", "none: remove single weights (sparsity or nm); channels: remove whole channels "
                         "(with their BatchNorm entries and every consumer's inputs) chosen and re-fitted by block "
                         "OBS, for a physically smaller, faster network; needs keep_macs, keep_params or "
                         "target_speedup (refine applies to weight masks only; dense_target re-fits each layer of the "
                         "smaller network to the dense outputs); with sparsity or nm too, the smaller network's "
                         "weights are then pruned to that pattern", ("none", "channels"))
    keep_macs: float | None = opt(None, "channels: fraction of the multiply-adds per image to keep, in (0, 1]",
                                  check=lambda v: 0 < v <= 1, want="in (0, 1]")
    keep_params: float | None = opt(None, "channels: fraction of the Conv2d/Linear weights to keep, in (0, 1]",
                                    check=lambda v: 0 < v <= 1, want="in (0, 1]")
    target_speedup: float | None = opt(None, "channels: instead of keep_macs, the measured speed-up to reach (e.g. "
                                       "2.0): each layer is timed at a few widths on speedup_runtime (a cached table), "
                                       "channels are allocated by seconds saved, and the smaller network is timed "
                                       "against the dense one until within 3% (a few tries)",
                                       check=lambda v: v > 1, want="above 1")
    speedup_runtime: str = opt("onnxruntime", "target_speedup: the runtime timed (onnxruntime on the CPU, "
                               "onnxruntime-int8 for the model export --int8 writes, openvino or openvino-bf16 on an "
                               "Intel CPU, or torch eager)", tuple(RUNTIMES))
    speedup_batch: int = opt(1, "target_speedup: images per call when timing", check=lambda v: v >= 1,
                             want="at least 1")
    round_to: int = opt(8, "channels: kept channel counts are multiples of this (efficient kernels; 16 for a wide "
                        "network run by ONNX Runtime on AVX-512 CPUs, whose convolutions work on 16-channel blocks, "
                        "too coarse for narrow ones: docs/CHANNELS.md)",
                        check=lambda v: v >= 1, want="at least 1")
    channel_costs: str = opt("kl", "channels: what the allocation compares across groups: layer (each group's "
                             "block-OBS error at its consumers, relative to their output energy) or kl (the same "
                             "removal order, its cost measured as the network's output KL on 256 calibration images "
                             "at up to 8 points per group: one forward pass each)", CHANNEL_COSTS)
    permute: bool | None = opt(None, "N:M: first reorder each group of tied channels (producers' rows, BatchNorms, "
                               "consumers' columns: the same function) so that each consumer's groups of M input "
                               "channels hold weights an N:M mask can keep more of (Pool & Yu 2021; saliencies "
                               "w²·mean(x²) from one dense pass; the saved model is in the new order). "
                               "Default (auto): for method sparsegpt at N:M without wbits, in one process, the groups "
                               "whose pruned consumers all take the swap refinement (rows·d³ within its budget; with "
                               "it, chosen on ten held-out seeds, docs/RESULTS.md); --permute: every group; "
                               "--no-permute: none")
    quant_clip: str = opt("minmax", "with wbits: each channel's grid spans its weights (minmax) or the range, shrunk "
                          "towards 0 by up to 40%, of least squared rounding error (mse)", CLIP)

    def __post_init__(self):
        if isinstance(self.ignore, (list, str)):
            object.__setattr__(self, "ignore", tuple([self.ignore] if isinstance(self.ignore, str) else self.ignore))
        check_fields(self, "")
        for pattern in [*self.ignore, *self.layer_patterns]:  # names or regular expressions (layer_plan)
            try:
                re.compile(str(pattern))
            except re.error as e:
                what = "ignore" if pattern in self.ignore else "layer_patterns"
                raise UserError(f"{what}: '{pattern}' is not a layer name or regular expression ({e}); escape "
                                "special characters with a backslash") from None
        # each layer's pattern as text, '0.9' or '2:4' (what a report records and a YAML file reads back)
        object.__setattr__(self, "layer_patterns", {str(k): str(layer_pattern(k, v))
                                                    for k, v in self.layer_patterns.items()})
        if self.sparsity is not None or self.nm is not None:  # (with channels: on the weights that stay)
            Pattern.parse(self.sparsity, self.nm)  # one of the two, well formed
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Every combination that cannot run is refused here, the one place, in the config's own terms."""
        r = self.resolved()
        if r.nm_share is not None and r.nm is None:
            raise UserError("nm_share is the share of the weights that take an N:M pattern: give nm (e.g. 2:4) "
                            "with it")
        if r.layer_patterns and r.sparsity is None and r.nm is None:
            raise UserError("layer_patterns gives some layers their own pattern: give sparsity or nm too, the other "
                            "layers' (sparsity 0 leaves them dense)")
        if r.structure == "channels":
            weights = r.sparsity is not None or r.nm is not None  # (then pruned on the smaller network)
            idle = [f"{k}={getattr(self, k)!r}" for k in WEIGHT_MASK_ONLY if not weights and getattr(self, k) not in
                    (FIELD_DEFAULTS[k], getattr(PUBLISHED, k))]  # (either preset's value: --recipe published runs)
            if idle:
                raise UserError(f"structure='channels' alone removes whole channels, chosen and re-fitted by block "
                                f"OBS: {', '.join(idle)} appl{'ies' if len(idle) == 1 else 'y'} to weight masks and "
                                "would change nothing. Drop it, or give sparsity or nm to prune the smaller network's "
                                "weights with it too")
            if sum(v is not None for v in (r.keep_macs, r.keep_params, r.target_speedup)) != 1:
                raise UserError("structure='channels' needs exactly one of keep_macs (e.g. 0.5), keep_params and "
                                "target_speedup (e.g. 2.0)")
            if (not weights and (r.wbits is not None or r.allocation != "uniform")) or r.reconstruct \
                    or r.stat_correction or r.bn_aware:
                raise UserError("structure='channels' removes whole channels: not combinable with reconstruct, "
                                "stat_correction or bn_aware yet (sparsity or nm, with wbits and an allocation or "
                                "not, then prune the weights of the smaller network)")
        elif r.keep_macs is not None or r.keep_params is not None or r.target_speedup is not None:
            raise UserError("keep_macs, keep_params and target_speedup are targets of structure='channels': give "
                            "that too")
        if self.solver == "exact" and r.method != "sparsegpt":
            raise UserError(f"solver='exact' is an OBS solver of method sparsegpt, not of '{r.method}'")
        if r.solver == "exact" and r.wbits is not None:
            raise UserError("solver='exact' does not quantize: use solver 'sparsegpt' or 'auto' (SparseGPT for the "
                            "quantized layers) with wbits")
        if r.structure == "channels" and (self.solver == "exact" or r.hessians != "pruned"):
            raise UserError("solver and hessians choose how weight masks are solved; structure='channels' chooses "
                            "channels by block OBS on dense Hessians already")
        if r.wbits is not None and r.refine != "none":
            raise UserError(f"refine='{r.refine}' moves the kept weights off their quantization grids: not combinable "
                            "with wbits (leave refine at 'auto' or 'none')")
        if r.wbits is not None and r.reconstruct:
            raise UserError("reconstruct moves the kept weights off their quantization grids: not combinable with "
                            "wbits")
        if r.quant == "gptq" and r.method != "sparsegpt":
            raise UserError(f"quant='gptq' rounds inside SparseGPT's column loop: method '{r.method}' can only round "
                            "to nearest (quant='rtn', or 'auto')")
        if r.permute and r.nm is None:
            raise UserError("permute reorders channels for an N:M mask: give nm (e.g. 2:4) with it")
        if r.nm is not None and r.allocation != "uniform":
            raise UserError(f"allocation='{r.allocation}' chooses unstructured sparsities per layer; N:M is uniform "
                            "by definition: use sparsity with it")
        if r.bn_aware and (r.method == "wanda" or r.nm is not None):
            raise UserError("bn_aware weighs rows against each other in an unstructured mask; "
                            f"{'wanda' if r.method == 'wanda' else 'N:M'} compares weights within each row, where it "
                            "would change nothing")

    @property
    def pattern(self) -> Pattern:
        return Pattern.parse(self.sparsity, self.nm)

    @property
    def stages(self) -> list[PruneConfig]:
        """What runs, in order: this config; or, for channels with a pattern (sparsity or nm), the channel prune
        (without the pattern) and then the pattern's prune of the smaller network (without the channel target), each
        resolving its own defaults (damping, refinement)."""
        if self.structure != "channels" or (self.sparsity is None and self.nm is None):
            return [self]
        defaults = {k: FIELD_DEFAULTS[k] for k in WEIGHT_MASK_ONLY}  # (the weight stage's)
        return [replace(self, sparsity=None, nm=None, wbits=None, permute=None, allocation="auto", layer_patterns={},
                        nm_share=None, **defaults),
                replace(self, structure="none", keep_macs=None, keep_params=None, target_speedup=None)]

    def for_layers(self, distributed: bool = False) -> dict[str, PruneConfig]:
        """Per entry of layer_patterns: the resolved config its layers are pruned with, this one with that pattern
        (its own refinement where refine is auto: swap at N:M, cg unstructured), uniform (the allocation is the
        other layers'), and no permutation of its own (the network's is for the main pattern)."""
        out = {}
        for key, text in self.layer_patterns.items():
            p = layer_pattern(key, text)
            out[key] = replace(self, sparsity=None if p.is_nm else p.sparsity, nm=f"{p.n}:{p.m}" if p.is_nm else None,
                               layer_patterns={}, allocation="uniform", permute=False, nm_share=None
                               ).resolved(distributed)
        return out

    @property
    def has_target(self) -> bool:
        """A pattern, or a structured target: enough to prune."""
        return self.sparsity is not None or self.nm is not None or self.structure != "none"

    def check_runnable(self, distributed: bool = False, device: torch.device | None = None) -> None:
        """What a prune needs beyond well-formed fields, checked before any work: a target, one process for
        the steps that read the whole calibration set at once (distributed: under a process group), and what the
        column loop needs on `device` (the model's, where known)."""
        if not self.has_target:
            raise UserError("give exactly one of sparsity (e.g. 0.5) and nm (e.g. 2:4), or structure='channels' "
                            "with keep_macs or keep_params")
        whole = [name for name, on in (("structure='channels'", self.structure != "none"),
                                       ("allocation owl/dp", self.allocation not in ("uniform", "auto")),
                                       ("stat_correction", self.stat_correction),
                                       ("nm_share", self.nm_share is not None and self.nm_share < 1),
                                       ("reconstruct", bool(self.reconstruct)),
                                       ("permute", self.permute)) if on]
        if device is not None and device.type == "mps":  # train and finetune run there; a prune cannot
            raise UserError("a prune cannot run on Apple's MPS: its Hessian sums and solves are in float64, which "
                            "MPS lacks; prune with --device cpu (the pruned model runs anywhere)")
        if self.column_loop == "triton" and (why := fused_unavailable(device)):
            raise UserError(f"column_loop triton: {why}")
        if self.target_speedup is not None:  # the runtime it times on, before hours of Hessians
            runtime(self.speedup_runtime)
        if distributed and whole:
            raise UserError(f"{', '.join(whole)}: these need the whole calibration set in one process: run them "
                            "without torchrun")

    def resolved(self, distributed: bool = False) -> PruneConfig:
        """The 'auto' fields replaced by what runs: the config a report records. distributed: under torchrun
        (where an allocation, which reads the whole calibration set at once, cannot run)."""
        if self.structure == "channels" and (self.sparsity is not None or self.nm is not None):
            w = self.stages[1].resolved(distributed)  # the weight choices are the second stage's; damping left to
            chosen = {k: getattr(w, k) for k in ("refine", "quant", "solver", "allocation", "permute")}  # each
            same = all(getattr(self, k) == v for k, v in chosen.items())  # stage where None (stages)
            return self if same else replace(self, **chosen)
        # N:M masks of OBS solves: where ten held-out seeds chose permute + swap (2:4 and 4:8, docs/RESULTS.md)
        nm_obs = self.structure == "none" and self.nm is not None and self.method == "sparsegpt" \
            and self.wbits is None
        refine = self.refine if self.refine != "auto" else ("none" if self.wbits is not None else "swap" if nm_obs
                                                            and self.inactive_weight == 1 else "cg")
        # None stays 'auto' (the groups within the swap's budget, chosen by the driver) where it applies
        permute = self.permute if self.permute is not None or (nm_obs and not distributed) else False
        allocation = self.allocation
        if allocation == "auto":
            dp = self.structure == "none" and self.sparsity is not None and self.nm is None \
                and self.method == "sparsegpt" and self.wbits is None and not distributed
            allocation = "dp" if dp else "uniform"
        quant = self.quant if self.quant != "auto" else ("gptq" if self.method == "sparsegpt" else "rtn")
        solver = self.solver
        percdamp = self.percdamp if self.percdamp is not None else (0.001 if self.structure == "channels" else 0.01)
        if self.structure == "channels":  # refine re-solves weight masks; channels are re-fitted by OBS
            refine = "none"
        if self.solver == "auto" and (self.method != "sparsegpt" or self.structure == "channels"):
            solver = "sparsegpt"  # no OBS weight solve to choose: what runs, and a stable recipe label
        if (refine, quant, solver, percdamp, allocation, permute) == (self.refine, self.quant, self.solver,
                                                                      self.percdamp, self.allocation, self.permute):
            return self
        return replace(self, refine=refine, quant=quant, solver=solver, percdamp=percdamp, allocation=allocation,
                       permute=permute)

    def idle(self) -> list[str]:
        """The options given that change nothing in this prune, each with what it needs (e.g. owl_lambda without
        allocation 'owl'): set to a value neither preset has, on a config whose resolved settings never read it."""
        r = self.resolved()
        given = [k for k in IDLE_UNLESS if getattr(self, k) not in (FIELD_DEFAULTS[k], getattr(PUBLISHED, k))]
        idle = []
        for k in given:
            without = replace(self, **{k: FIELD_DEFAULTS[k]}).resolved()  # (a value resolved() made is no choice,
            if not IDLE_UNLESS[k][0](r) and getattr(self, k) != getattr(without, k) and all(  # nor one that moves
                    getattr(r, f) == getattr(without, f) for f in AUTO_FIELDS):  # what 'auto' resolves to)
                idle.append(f"{k}={getattr(self, k)!r} (needs {IDLE_UNLESS[k][1]})")
        return idle

    def as_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


RECOMMENDED = PruneConfig()  # chosen on held-out images: docs/RESULTS.md, "Beyond uniform SparseGPT"
# the methods as published (channels: priced by the consumers' errors alone, this project's first channel recipe)
PUBLISHED = PruneConfig(solver="sparsegpt", refine="none", dense_target=False, intercept=False, channel_costs="layer",
                        percdamp=0.01, allocation="uniform", dp_measure="layer", permute=False)
PRESETS = {"recommended": RECOMMENDED, "published": PUBLISHED}
PRUNE_KEYS = tuple(f.name for f in fields(PruneConfig))
FIELD_DEFAULTS = {f.name: f.default for f in fields(PruneConfig) if f.default is not MISSING}
# per option that only some prunes read: whether a resolved config reads it, and what that needs (PruneConfig.idle)
_DENSE_TARGET = (lambda r: r.dense_target and r.hessians == "pruned", "dense_target with hessians 'pruned'")
_WBITS = (lambda r: r.wbits is not None, "wbits")
_CHANNELS = (lambda r: r.structure == "channels", "structure 'channels'")
_SPEEDUP = (lambda r: r.target_speedup is not None, "target_speedup")
IDLE_UNLESS = {
    "owl_lambda": (lambda r: r.allocation == "owl", "allocation 'owl'"),
    "dp_measure": (lambda r: r.allocation == "dp", "allocation 'dp'"),
    "budget": (lambda r: r.allocation in ("owl", "dp"), "allocation 'owl' or 'dp'"),
    "quant": _WBITS, "quant_clip": _WBITS,
    "target_share": _DENSE_TARGET, "residual_target": _DENSE_TARGET, "inactive_weight": _DENSE_TARGET,
    "refit_dense_layers": _DENSE_TARGET,
    "round_to": _CHANNELS, "channel_costs": _CHANNELS, "speedup_runtime": _SPEEDUP, "speedup_batch": _SPEEDUP,
}
AUTO_FIELDS = ("refine", "quant", "solver", "percdamp", "allocation", "permute")  # what resolved() fills in
# the settings of a weight mask's solve, which a channel prune alone does not read (structure='channels' without a
# pattern refuses values of theirs that neither preset has; the channel stage of channels-then-a-pattern resets them)
WEIGHT_MASK_ONLY = ("method", "refine", "target_share", "residual_target", "inactive_weight", "refit_dense_layers",
                    "budget", "owl_lambda", "dp_measure", "blocksize", "column_loop", "prune_all")


# The settings beyond SparseGPT's layer solve; a results file labels each run by those that differ from the
# published method's (recipe_label), so a label means the same in every file whatever the defaults become.
RECIPE_KEYS = ("solver", "hessians", "allocation", "budget", "owl_lambda", "dp_measure", "bn_aware", "stat_correction",
               "refine", "dense_target", "target_share", "residual_target", "inactive_weight", "refit_dense_layers",
               "intercept", "reconstruct", "wbits", "quant", "quant_clip", "structure", "keep_macs", "keep_params",
               "target_speedup", "round_to", "channel_costs", "permute", "outputs", "layer_patterns",
               "nm_share")
CHANNEL_ONLY = ("channel_costs", "round_to")  # settings that change nothing without structure='channels'
DP_ONLY = ("dp_measure",)  # settings that change nothing without allocation='dp'


def recipe_label(config: PruneConfig) -> str:
    """e.g. 'refine=cg,dense_target=True' ('' for the method as published), from the resolved settings."""
    r = config.resolved()
    published = replace(PUBLISHED, method=config.method, wbits=config.wbits).resolved()
    return ",".join(f"{k}={'auto' if getattr(r, k) is None else getattr(r, k)}" for k in RECIPE_KEYS
                    if (r.wbits is not None if k == "wbits" else getattr(r, k) != getattr(published, k))
                    and (r.structure == "channels" or k not in CHANNEL_ONLY)
                    and (r.allocation == "dp" or k not in DP_ONLY))

