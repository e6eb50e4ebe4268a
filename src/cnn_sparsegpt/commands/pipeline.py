"""What `cnn-sparsegpt prune` does: load, calibrate, evaluate, prune, evaluate, write results."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..pruning import dist
from ..pruning.config import recipe_label
from .dense_accuracy_cache import dense_key, lookup, store
from .options import PruneOptions
from ..data.datasets import DATASET_CHOICES, calibration_indices, calibration_set, holdout_split, load_splits
from ..models import check_model_name, create_model, head_classes, is_video_model, model_entry
from ..checkpoints import fit_keys, load_state_dict
from ..models.pretrained import is_pretrained, pretrained_file
from ..models.registry import user_factory
from ..data.preprocess import Preprocess, is_tensor_file, resolve as resolve_preprocess
from ..pruning.prune import channel_plan, prune_model
from ..pruning.slicing import apply_structure
from .report import REPORT_SCHEMA, read_report
from .train import compare_outputs, evaluate
from ..utils import (
    UserError,
    classifier_logits,
    atomic_file,
    atomic_save,
    atomic_write_json,
    check_finite,
    ensure_writable,
    first_line,
    forward_checked,
    load_tensors,
    output_tensors,
    resolve_device,
    run_metadata,
    save_safetensors,
)


def checkpoint_state(model_name: str, path: str | Path,
                     kwargs: dict | None = None) -> tuple[dict[str, torch.Tensor], int | None]:
    """A checkpoint's tensors for model `model_name` (built with `kwargs`; checked finite, and a wrapper's prefix
    removed where the file holds the model under one: a PyTorch Lightning module's 'model.'; fit_keys), and the
    number of classes its head has (head_classes; one probe model serves both)."""
    state = load_state_dict(path)
    check_finite(state, f"checkpoint {path}")
    probe = create_model(model_name, num_classes=7, state=state, kwargs=kwargs)
    state = fit_keys(state, probe.state_dict().keys(), path)
    # keys now, before any data is loaded; shapes when the model is built with the head's classes and loads it
    check_fits(probe.state_dict(), state, path, model_name, shapes=False)
    return state, head_classes(model_name, state, probe)


def model_kwargs_for(opts: PruneOptions) -> dict:
    """The builder's keyword arguments: --model-kwargs, else those `train` recorded in the checkpoint's .json for the
    same model."""
    if opts.model_kwargs or not opts.weights:
        return opts.model_kwargs
    meta = read_metadata(opts.weights)
    kwargs = meta.get("model_kwargs") if meta.get("model") == opts.model else None
    return dict(kwargs) if isinstance(kwargs, dict) else {}


def load_weights(model: nn.Module, path: str | Path, model_name: str, state: dict) -> None:
    """Load a checkpoint's state (read from `path`) strictly; on mismatch say which keys or shapes differ."""
    check_fits(model.state_dict(), state, path, model_name)
    model.load_state_dict(state)


def check_fits(own: dict, state: dict, path: str | Path, model_name: str, shapes: bool = True) -> None:
    """A UserError naming the keys (and, with `shapes`, the shapes) in which a checkpoint's state and a model's
    state_dict `own` differ."""
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    differ = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & state.keys()
              if shapes and own[k].shape != state[k].shape]
    if missing or unexpected or differ:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])}"
                         f"{', ...' if len(unexpected) > 3 else ''})")
        if differ:
            parts.append(f"shapes differ (checkpoint vs model): {'; '.join(sorted(differ)[:3])}")
        raise UserError(f"checkpoint {path} does not fit model '{model_name}': {'; '.join(parts)}. "
                        "Is it a checkpoint of another architecture?")


def read_metadata(path: str | Path) -> dict:
    """The checkpoint's PATH.json (what `train` writes: normalization, preprocess, accuracy), or {}."""
    meta_path = Path(f"{path}.json")
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            return meta if isinstance(meta, dict) else {}
        except (json.JSONDecodeError, OSError):
            return {}
    return {}


def _data_classes(data) -> int:
    return len(data.classes) if getattr(data, "classes", None) else data.num_classes


def dataset_for(model: str, given: str | None) -> str:
    """The dataset a run of `model` uses: `given` (--dataset), else the registered model's own; a clear error when
    neither names one. The model name is checked first (fail fast, before any data is loaded)."""
    check_model_name(model)
    entry = model_entry(model)
    dataset = given or (entry.dataset if entry else None)
    if dataset is None:
        raise UserError(f"--dataset is required for model '{model}': give {DATASET_CHOICES}")
    return dataset


def eval_subset(test, n: int):
    """The evaluation images `--eval-samples n` measures: a fixed random subset (files are often sorted by class),
    the same for every run, so that `export --int8` can measure the images a prune did."""
    return test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n])


AUTO_HOLDOUT = 1000  # most evaluation images held out of a folder of unlabelled images without val/ or test/


class Prepared(NamedTuple):
    model: nn.Module  # with its weights, in eval mode, on the run's device
    train: object  # the training split (ImageSet or FolderSet): calibration images come from it
    test: object  # the evaluation split: test/val, held-out training images, or a subset of either
    dataset: str
    preprocess: Preprocess
    eval_split: str  # "test" or "holdout N" (report.json's eval_split, which run_images reads back)
    metric: str | None  # "top1" or "output" (what --evaluate measures, choose_metric); None without --evaluate


def probe(model: nn.Module, data, device: torch.device):
    """The model's output on the first two images of `data`, or a one-line error where it cannot run on them (a model
    built for other images: its channels, size or preprocessing), before minutes of calibration."""
    x, _ = next(data.batches(2, device, indices=torch.arange(min(2, len(data)))))
    return forward_checked(model, x, f"the dataset's inputs (a batch of shape {list(x.shape)})",
                           ". Check --dataset, --image-size and --preprocess against what the model was built for")


def choose_metric(asked: str, out, data) -> str:
    """--metric: top1 where asked for (after checking that it can be measured) or, for auto, where the model's
    output `out` (on two images, probe) is (N, classes) logits and the images have labels; output otherwise."""
    if asked == "output":
        return "output"
    logits = classifier_logits(out) is not None  # (a tensor, or a mapping's 'logits': Hugging Face's models)
    if asked == "top1" and not data.labelled:
        raise UserError("--metric top1 needs labelled images: mnist, cifar10, or an ImageFolder with train/ and val/ "
                        "(or test/) subfolders of <class>/<image>; without labels use --metric output")
    if asked == "top1" and not logits:
        shapes = [list(t.shape) for t in output_tensors(out)]
        raise UserError(f"--metric top1 needs a classifier's (N, classes) logits, and this model returns "
                        f"{type(out).__name__} {shapes}: use --metric output (its outputs against the dense model's)")
    return "top1" if logits and data.labelled else "output"


def prepare(opts: PruneOptions, device: torch.device) -> Prepared:
    """Model (with weights), the train and evaluation sets preprocessed as the model expects, and what is measured."""
    dataset = dataset_for(opts.model, opts.dataset)
    if is_video_model(opts.model) and not is_tensor_file(dataset):
        raise UserError(f"{opts.model} is a video classifier: give it clips as a tensor file, --dataset clips.pt "
                        "holding {'train': (N, 3, T, H, W) preprocessed clips, 'train_labels', 'test', 'test_labels'}")
    entry = model_entry(opts.model)
    state, head, meta = None, None, {}
    if opts.weights:  # a bad checkpoint is reported before minutes of data loading
        state, head = checkpoint_state(opts.model, opts.weights, opts.model_kwargs)
        meta = read_metadata(opts.weights)
    else:  # likewise a builder that fails (random weights: the data's classes decide the head, below)
        create_model(opts.model, num_classes=7, kwargs=opts.model_kwargs)
    pre = resolve_preprocess(opts.preprocess, opts.model, dataset, meta, opts.image_size, opts.crop_pct,
                             entry.dataset if entry else None, opts.weights)
    labels = {"top1": "classes", "output": "none"}.get(opts.metric, "auto")
    train, test = load_splits(dataset, opts.data_dir, pre, opts.streaming, opts.workers, labels)
    classes = _data_classes(train) if train.labelled else None
    model = create_model(opts.model, num_classes=head or (max(classes, 2) if classes else None), state=state,
                         kwargs=opts.model_kwargs)
    if opts.weights:
        load_weights(model, opts.weights, opts.model, state)
    else:
        import warnings

        warnings.warn("no --weights given: pruning the model as its builder made it (random weights, unless your "
                      "own builder loads some)" if user_factory(opts.model) else
                      "no --weights given: pruning a randomly initialized model", RuntimeWarning)
    model = model.to(device).eval()
    out = probe(model, train, device)
    metric = choose_metric(opts.metric, out, train) if opts.evaluate else None
    if metric == "top1" and head is not None and head != classes:
        raise UserError(f"the checkpoint's head has {head} outputs but {dataset} has {classes} classes: accuracy "
                        "would be meaningless. Use the dataset the model was trained on (an ImageNet-style folder "
                        "needs all its classes, as sorted wnid folders), or measure the outputs against the dense "
                        "model's with --metric output")
    holdout = opts.holdout
    if test is None:  # unlabelled images without val/ or test/: evaluate on images calibration never sees
        if len(train) < 2:
            raise UserError(f"{dataset} holds {len(train)} image(s): calibration and evaluation need at least 2")
        holdout = holdout or max(1, min(AUTO_HOLDOUT, len(train) // 10))
    if holdout:  # disjoint from the calibration images, which are drawn from the rest
        train, test = holdout_split(train, holdout)
    if opts.eval_samples:
        test = eval_subset(test, opts.eval_samples)
    return Prepared(model, train, test, dataset, pre, f"holdout {holdout}" if holdout else "test", metric)


def calibration_digest(train, chosen: torch.Tensor) -> str:
    """What report.json records of the calibration images: which of how many (the same images for every method)."""
    return hashlib.sha1(f"{len(train)}:{chosen.tolist()}".encode()).hexdigest()[:12]


def run_preprocess(report: dict) -> Preprocess:
    """The preprocessing a run recorded (report.json's `preprocess`)."""
    return Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in report["preprocess"].items()})


def run_images(report: dict, data_dir: str | None = None, streaming: str = "auto", workers: int | None = None,
               nsamples: int | None = None, eval_samples: int | None = None):
    """A run's calibration images (the first `nsamples` of them) and evaluation split as `prune` drew them (its
    dataset, preprocessing, seed, held-out split and evaluation subset, from report.json), and whether the
    calibration images are the run's own (the digest report.json recorded)."""
    train, test = load_splits(report["dataset"], data_dir, run_preprocess(report), streaming, workers,
                              report.get("data_labels") or "classes")
    split = str(report.get("eval_split") or "test")
    if split.startswith("holdout"):
        train, test = holdout_split(train, int(split.split()[1]))
    if (report.get("eval_samples") or len(test)) < len(test):  # the run measured a subset (--eval-samples)
        test = eval_subset(test, report["eval_samples"])
    if eval_samples:
        test = test.subset(torch.arange(min(eval_samples, len(test))))
    chosen = calibration_indices(train, int(report["nsamples"]), int(report.get("seed") or 0))
    same = calibration_digest(train, chosen) == report.get("calibration_digest")
    calib = calibration_set(train, len(chosen), indices=chosen[:nsamples] if nsamples else chosen)
    return calib, test, same


def resolved_options(opts: PruneOptions, progress: bool = True) -> PruneOptions:
    """The options with `--weights pretrained` resolved to its file (downloaded once; report.json names it) and the
    builder's keyword arguments found (model_kwargs_for)."""
    if is_pretrained(opts.weights):
        check_model_name(opts.model)
        opts = dataclasses.replace(opts, weights=pretrained_file(opts.model, opts.weights, progress))
    return dataclasses.replace(opts, model_kwargs=model_kwargs_for(opts))


def plan_prune(opts: PruneOptions, progress: bool = True) -> dict:
    """What `prune` would do to each layer, without pruning or writing: the model, its weights and data as the prune
    loads them, then the prune's own code over two calibration images with magnitude masks (no Hessians), which
    decides the same layers pruned and the same reasons for the others (`prune --dry-run`)."""
    from ..pruning.config import PUBLISHED

    opts = resolved_options(opts, progress)
    device = resolve_device(opts.device)
    opts.config.check_runnable(False, device)
    prep = prepare(dataclasses.replace(opts, evaluate=False), device)
    common = {"model": opts.model, "data_source": prep.train.source, "preprocess": prep.preprocess.as_dict()}
    if opts.config.structure == "channels":  # which channels may go (how many do is the calibration statistics')
        example = calibration_set(prep.train, 1, opts.seed).to(device)
        return common | {"pattern": "channels", "groups": channel_plan(prep.model, example, opts.config.ignore)}
    config = dataclasses.replace(PUBLISHED, method="magnitude", sparsity=opts.config.sparsity, nm=opts.config.nm,
                                 ignore=opts.config.ignore, prune_all=opts.config.prune_all, bn_recalibration=False,
                                 layer_patterns=opts.config.layer_patterns)
    report = prune_model(prep.model, calibration_set(prep.train, 2, opts.seed), config, progress=False)
    layers = [{"name": x.name, "shape": x.shape, "weights": math.prod(x.shape), "reason": x.reason if x.skipped
               else "", "pattern": x.pattern} for x in report.layers]
    return common | {"pattern": report.pattern, "layers": layers, "nm_share": opts.config.nm_share}


def format_plan(plan: dict) -> str:
    """plan_prune's result as a table and a line of totals."""
    if plan["pattern"] == "channels":
        return _format_channel_plan(plan)
    lines = [f"{'layer':<28} {'shape':<18} {'weights':>9}  plan"]
    for x in plan["layers"]:
        shape = "x".join(map(str, x["shape"]))
        what = f"stays dense: {x['reason']}" if x["reason"] else f"prune {x.get('pattern', '')}".rstrip()
        lines.append(f"{x['name']:<28} {shape:<18} {x['weights']:>9}  {what}")
    pruned = [x for x in plan["layers"] if not x["reason"]]
    total, kept = sum(x["weights"] for x in plan["layers"]), sum(x["weights"] for x in pruned)
    lines.append(f"\n{plan['model']} {plan['pattern']}: would prune {len(pruned)} of {len(plan['layers'])} layers, "
                 f"{kept / 1e6:.2f} of {total / 1e6:.2f} M weights of its Conv/Linear layers "
                 f"({kept / max(1, total):.1%})\n  data: {plan['data_source']}{_preprocess_line(plan)}")
    if plan.get("nm_share") is not None and plan["nm_share"] < 1:
        lines.append(f"  with nm_share {plan['nm_share']:g}, the layers whose {plan['pattern']} costs the most at the "
                     "output stay dense: chosen by the prune from the calibration images")
    return "\n".join(lines)


def _format_channel_plan(plan: dict) -> str:
    lines = [f"{'channels of':<36} {'channels':>8} {'may go':>7}  plan"]
    for g in plan["groups"]:
        who = g["producers"][0] + (f" (+{len(g['producers']) - 1} tied)" if len(g["producers"]) > 1 else "")
        lines.append(f"{who:<36} {g['channels']:>8} {g['removable']:>7}  {g['reason'] or 'removable'}")
    free = [g for g in plan["groups"] if g["removable"]]
    total, removable = sum(g["channels"] for g in plan["groups"]), sum(g["removable"] for g in free)
    lines.append(f"\n{plan['model']} channels: {removable} of {total} channels in {len(free)} of "
                 f"{len(plan['groups'])} groups may be removed; how many are is decided by the calibration "
                 f"statistics and the budget\n  data: {plan['data_source']}{_preprocess_line(plan)}")
    return "\n".join(lines)


def run_prune(opts: PruneOptions, progress: bool = True, dense_acc: float | None = None,
              write: bool = True, return_model: bool = False):
    """Run one prune and (when `write`) save model.pt, masks.pt and report.json under opts.out; returns the report
    (and the pruned model with `return_model`). Under torchrun (the processes it started) the calibration set is
    shared by them and rank 0 writes."""
    device = dist.init(opts.device) if dist.launched() else resolve_device(opts.device)
    group = dist.process_group()
    dist.check_same(json.dumps(dataclasses.asdict(opts), sort_keys=True, default=str), "arguments")
    opts = resolved_options(opts, progress)
    opts.config.check_runnable(dist.active(group), device)  # prune_model's own checks, before any data is loaded
    if not opts.evaluate and (opts.eval_samples or opts.metric != "auto"):
        import warnings

        warnings.warn("--eval-samples and --metric choose what --evaluate measures: with --no-evaluate they change "
                      "nothing", RuntimeWarning)
    config = opts.config.resolved(dist.active(group))
    progress = progress and dist.is_main(group)
    write = write and dist.is_main(group)  # one rank writes model.pt, masks.pt, report.json
    out = ensure_writable(opts.out) if write else None
    prep = prepare(opts, device)
    model, train, test, pre = prep.model, prep.train, prep.test, prep.preprocess
    chosen = calibration_indices(train, opts.nsamples, opts.seed)  # the same images for every method: a digest
    calib = calibration_set(train, opts.nsamples, indices=chosen)
    calib_digest = calibration_digest(train, chosen)
    eval_seconds, dense, dense_from = 0.0, None, "measured" if dense_acc is None else "given"
    t0 = time.perf_counter()
    if prep.metric == "top1" and dense_acc is None:
        key = dense_key(model, opts.model, opts.model_kwargs, test, device, config.batch_size) \
            if opts.reuse_dense and not dist.active(group) else None
        cached = lookup(key)
        if cached:
            dense_acc, dense_from = cached["dense_acc"], f"cache: measured {cached['date']}"
        else:
            dense_acc = evaluate(model, test, device, config.batch_size, progress, "dense accuracy", group)
            store(key, dense_acc, len(test), opts.weights)
    elif prep.metric == "output":  # the reference: the dense model's outputs on the same images
        dense, dense_acc = copy.deepcopy(model), None
    eval_seconds += time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    resume = out / "resume.pt" if write else None  # an interrupted prune goes on from there (pruning/resume.py)
    try:
        report = prune_model(model, calib, config, progress=progress, process_group=group, resume=resume)
    except KeyboardInterrupt:
        if resume is not None and resume.is_file():
            print(f"the pruned layers are kept in {resume}: the same command goes on from there", file=sys.stderr)
        raise
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    check_finite(state, "the pruned model")  # never write a checkpoint with NaN
    result = {
        "schema": REPORT_SCHEMA,
        "model": opts.model, "model_kwargs": opts.model_kwargs, "weights": opts.weights, "dataset": prep.dataset,
        "data_source": train.source,
        "data_labels": "classes" if train.labelled else "none",
        "data_storage": train.storage, "preprocess": pre.as_dict(), "calibration_digest": calib_digest,
        "seed": opts.seed, "input_shape": list(calib.shape[1:]),
        "method": config.method, "pattern": report.pattern,
        "target_sparsity": config.pattern.target if config.structure == "none" else None,
        "recipe": opts.recipe, "recipe_label": recipe_label(config),
        "metric": prep.metric, "dense_acc": dense_acc, "dense_acc_from": dense_from if dense_acc is not None else None,
        "pruned_acc": None,
        "output_error": None, "output_agreement": None, "output_agreement_over": None,
        "eval_samples": len(test), "eval_seconds": eval_seconds, "eval_split": prep.eval_split,
        "peak_gpu_memory": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    } | report.as_dict() | run_metadata(device)
    if write:  # before the evaluation (minutes on a large split): an interrupted one leaves a run to use
        atomic_save(state, out / "model.pt")
        if opts.save_safetensors:
            save_safetensors(state, out / "model.safetensors")
        atomic_save(report.masks, out / "masks.pt")
        if report.quantized:
            atomic_save(report.quantized, out / "quant.pt")
        if config.structure != "none":  # the smaller network, loadable with torch alone (no pickled code)
            result["exported_program"] = save_exported_program(model, calib[:2], out / "model.pt2")
        if prep.metric:
            atomic_write_json(result | {"evaluation": "interrupted before the pruned model was measured"},
                              out / "report.json")
    t0 = time.perf_counter()
    if prep.metric == "top1":
        result["pruned_acc"] = evaluate(model, test, device, config.batch_size, progress, "pruned accuracy", group)
    elif prep.metric == "output":
        compared = compare_outputs(model, dense, test, device, config.batch_size, progress, "output error", group,
                                   scores=config.outputs == "scores")
        del dense
        result |= {"output_error": compared.get("error"), "output_agreement": compared.get("agreement"),
                   "output_agreement_over": compared.get("agreement_over")}
    result["eval_seconds"] = eval_seconds + time.perf_counter() - t0
    if write:
        atomic_write_json(result, out / "report.json")
    return (result, model) if return_model else result


def save_exported_program(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """model as a torch.export program with a dynamic batch (torch.export.load(path).module() runs it); the file
    name, or why it could not be written (a warning: model.pt is there either way)."""
    import warnings

    try:
        program = torch.export.export(model.eval(), (example.cpu(),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
        atomic_file(path, lambda tmp: torch.export.save(program, tmp), suffix=".tmp.pt2")  # torch wants .pt2
    except Exception as e:  # an op torch.export cannot capture: say so, keep the state dict
        first = first_line(e)
        warnings.warn(f"no model.pt2: torch.export failed ({first})", RuntimeWarning)
        return f"not written: {first}"
    return path.name


def _preprocess_line(r: dict) -> str:
    p = r.get("preprocess")
    if not p:
        return ""
    if not p["mean"]:  # a tensor file's inputs, served as they are
        return f"\n  preprocessing: {p['source']}"
    geo = (f"shorter side {p['resize']} ({p['interpolation']}), center crop {p['crop']}, " if p.get("crop")
           else "images at their size, ")
    mean = ", ".join(f"{v:.4g}" for v in p["mean"])
    std = ", ".join(f"{v:.4g}" for v in p["std"])
    return f"\n  preprocessing: {geo}mean ({mean}), std ({std}) from {p['source']}"


def measured(r: dict) -> str:
    """What a run's evaluation measured, in a few words (bench's progress lines, format_report)."""
    if r.get("pruned_acc") is not None:
        dense = f"{100 * r['dense_acc']:.2f}% -> " if r.get("dense_acc") is not None else ""
        return f"top-1 {dense}{100 * r['pruned_acc']:.2f}%"
    e = r.get("output_error")
    if e is None:
        return "not evaluated"
    snr = f", {-10 * math.log10(e):.1f} dB" if 0 < e < math.inf else ""
    agree = r.get("output_agreement")
    same = f"; the dense model's top class at {100 * agree:.2f}% of {r.get('output_agreement_over')}" \
        if agree is not None else ""
    return f"output error {e:.3g} (relative squared, against the dense model's outputs{snr}){same}"


def format_report(r: dict) -> str:
    """A short table: per-layer results, then the totals."""
    st = r.get("structure") or {}
    if st:  # a channel prune: each layer's shape before and after (its layers have no weight sparsity)
        return "\n".join([_channel_table(st["layers"]), _totals(r)])
    lines = [f"{'layer':<28} {'shape':<18} {'sparsity':>8} {'rel.err':>9} {'sec':>6}  note"]
    for layer in r["layers"]:
        shape = "x".join(map(str, layer["shape"]))
        err = f"{layer['error']:.2e}" if layer["error"] is not None else "-"
        note = f"skipped: {layer['reason']}" if layer["skipped"] else layer["reason"]
        if not layer["skipped"] and ":" in str(layer.get("pattern")) and layer["pattern"] != r["pattern"]:
            note = f"{layer['pattern']} (layer_patterns){'; ' * bool(note)}{note}"
        lines.append(f"{layer['name']:<28} {shape:<18} {layer['sparsity']:>8.3f} {err:>9} "
                     f"{layer['seconds']:>6.2f}  {note}")
    return "\n".join([*lines, _totals(r)])


def _channel_table(layers: list[dict]) -> str:
    lines = [f"{'layer':<28} {'shape before':<18} {'shape after':<18} {'weights kept':>12}"]
    for x in layers:
        before, after = ("x".join(map(str, x[k])) for k in ("shape_before", "shape_after"))
        kept = math.prod(x["shape_after"]) / max(1, math.prod(x["shape_before"]))
        lines.append(f"{x['name']:<28} {before:<18} {after if after != before else 'unchanged':<18} {kept:>12.1%}")
    return "\n".join(lines)


def _totals(r: dict) -> str:
    """What format_report prints under its table: the prune's totals, the accuracy, the data."""
    lines = []
    acc = ""
    images = f"{r['eval_samples']} {'held-out' if str(r.get('eval_split', 'test')).startswith('holdout') else 'test'}"
    if r.get("dense_acc") is not None and r.get("pruned_acc") is not None:
        cached = " (dense from the cache of an earlier prune's measurement)" \
            if str(r.get("dense_acc_from")).startswith("cache") else ""
        acc = (f"  top-1 dense {100 * r['dense_acc']:.2f}% -> pruned {100 * r['pruned_acc']:.2f}% "
               f"({100 * (r['pruned_acc'] - r['dense_acc']):+.2f}) on {images} images{cached}\n")
    elif r.get("output_error") is not None:
        why = "" if r.get("data_labels") == "classes" else "; the images have no labels"
        acc = f"  {measured(r)} on {images} images{why}\n"
    passes = ""
    if r.get("peak_stored_mb") is not None:
        mode = f" (memory policy: {r['memory_policy']})" if r.get("memory_policy") else ""
        passes = (f"  {r['forward_passes']:.3g} forward pass(es) over the calibration set, at most "
                  f"{r['peak_stored_mb']:.0f} MB of its activations held{mode}\n")
    recipe = f"  options beyond uniform {r['method']}: {r['recipe_label']}\n" if r.get("recipe_label") else ""
    perm = r.get("permutation") or {}
    groups, wide = perm.get("groups") or [], perm.get("left_wide") or []
    if groups:
        before, after = sum(g["pruned_before"] for g in groups), sum(g["pruned_after"] for g in groups)
        recipe += (f"  channels reordered for {r['pattern']}: {sum(g['swaps'] for g in groups)} swaps in {len(groups)} "
                   f"groups, saliency the masks drop {100 * (after / before - 1) if before else 0.0:+.1f}%"
                   f"{f' ({len(wide)} wider groups left in order)' if wide else ''}\n")
    if perm.get("note"):
        recipe += f"  channel order for {r['pattern']}: {perm['note']}\n"
    share = (r.get("allocation") or {}).get("nm_share")
    if share:
        recipe += (f"  {r['pattern'].rsplit('+', 1)[-1]} on {share['covered']:.1%} of the pruned layers' "
                   f"{'multiply-adds' if share['budget'] == 'flops' else 'weights'} (nm_share {share['nm_share']:g}); "
                   f"{len(share['dense'])} layers kept dense, those whose pattern costs the most at the output\n")
    st = r.get("structure") or {}
    if st:
        (md, mk), (pd, pk) = st["macs"], st["params"]
        lines.append(f"\n{r['model']} channels: {mk / 1e6:.1f} of {md / 1e6:.1f} M multiply-adds per image kept "
                     f"({mk / md:.1%}), {pk / 1e6:.2f} of {pd / 1e6:.2f} M weights ({pk / pd:.1%}); "
                     f"{r['seconds']:.1f} s pruning, {r['nsamples']} calibration images")
        if r.get("stages"):  # then a pattern on the weights of the smaller network
            lines.append(f"  then {r['pattern'].split('+', 1)[1]} ({r['method']}): sparsity {r['sparsity']:.3f} of "
                         f"the pruned layers, {r['total_sparsity']:.3f} of all weights")
        if st.get("latency"):
            lat = st["latency"]
            lines.append(f"  measured speed-up {lat['measured_speedup']:.2f}x on {lat['runtime']} at batch "
                         f"{lat['batch']} (target {lat['target_speedup']:g}x, {len(lat['tries'])} tries"
                         f"{'' if lat.get('reached', True) else ': not reached'})")
    head = "" if st else (  # a channel prune's summary is the line above: its layers have no weight sparsity
        f"\n{r['model']} {r['method']} {r['pattern']}: sparsity {r['sparsity']:.3f} of the pruned layers, "
        f"{r['total_sparsity']:.3f} of all weights; {r['seconds']:.1f} s pruning, {r['nsamples']} calibration images\n")
    lines.append(f"{head}{recipe}{acc}{passes}  data: {r['data_source']}{_preprocess_line(r)}")
    return "\n".join(lines)


def _run_classes(report: dict, head: int | None) -> int | None:
    """The num_classes a run's model is rebuilt with: its checkpoint's head; else the builder's default for a run on
    unlabelled images (as prepare built it), 10 for the others (what runs before that distinction used)."""
    return head or (None if report.get("data_labels") == "none" else 10)


def load_run(run_dir: str | Path) -> tuple[nn.Module, dict, dict]:
    """The pruned model of a `prune` (or `finetune`) output folder (eval mode), its report and its masks; every
    missing, truncated or malformed file is one UserError that names it."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run} (give the --out folder of a `cnn-sparsegpt prune` run)")
    for f in ("model.pt", "report.json"):
        if not (run / f).is_file():
            raise UserError(f"{run} has no {f}: give the --out folder of a `cnn-sparsegpt prune` run")
    report = read_report(run / "report.json")
    check_model_name(report["model"])
    state = load_state_dict(run / "model.pt")
    kwargs = report.get("model_kwargs")
    model = create_model(report["model"], state=state, kwargs=kwargs,
                         num_classes=_run_classes(report, head_classes(report["model"], state, kwargs=kwargs)))
    if report.get("structure", {}).get("spec"):  # a structured run: the smaller shapes first
        apply_structure(model, report["structure"]["spec"])
    load_weights(model, run / "model.pt", report["model"], state)
    masks = load_tensors(run / "masks.pt", "mask file") if (run / "masks.pt").is_file() else {}
    if not isinstance(masks, dict) or any(k not in state or not isinstance(m, torch.Tensor) or m.shape != state[k].shape
                                          for k, m in masks.items()):
        raise UserError(f"{run / 'masks.pt'} does not match model.pt (a parameter name → bool tensor of its shape "
                        "each)")
    return model.eval(), report, masks


def load_dense(report: dict, weights: str | Path | None = None) -> nn.Module:
    """The dense model a run was pruned from (eval mode): its checkpoint as the report names it, or `weights`."""
    if not (weights or report.get("weights")):
        raise UserError("this run pruned a randomly initialized model (no --weights): there is no dense checkpoint "
                        "to compare with; name one with --teacher")
    path = Path(weights or report["weights"])
    if not path.is_file():
        raise UserError(f"the dense checkpoint '{path}' (the run's --weights) is not here: name it with --teacher")
    state, head = checkpoint_state(report["model"], path, report.get("model_kwargs"))
    model = create_model(report["model"], num_classes=_run_classes(report, head), state=state,
                         kwargs=report.get("model_kwargs"))
    load_weights(model, path, report["model"], state)
    return model.eval()
