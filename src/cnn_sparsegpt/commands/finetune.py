"""`cnn-sparsegpt finetune RUN_DIR`: a few epochs of the `train` loop on a pruned run, masks kept exactly
(pruned weights zeroed before training and after every optimizer step), written as a new run folder. A run measured
by its outputs (`prune --metric output`: not a classifier, or images without labels) is trained towards the dense
model's outputs instead of labels, and measured by its output error. A quantized
run (quant.pt) is fine-tuned through its grids with a straight-through estimator (quant.OnGrid): the weights stay
on the grids they were quantized on, and quant.pt is written anew."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..pruning.batchnorm import bn_modules, recalibrate
from ..data.datasets import calibration_set, holdout_split, load_splits
from .pipeline import load_dense, load_run, run_preprocess
from ..kernels.quant import attach_grids, detach_grids
from .train import (AUTO_OPTIMIZER, FINETUNE, FINETUNE_DROPOUT, FINETUNE_LR, OPTIMIZERS, TrainConfig,
                    compare_outputs, evaluate, train_model)
from ..utils import (
    UserError,
    atomic_save,
    atomic_write_json,
    ensure_writable,
    load_tensors,
    resolve_device,
    run_metadata,
)


# report.json's keys for what fine-tuning measured: top-1, or (a run measured by its outputs) the output error
ACCURACY_NAMES = {"before": "pruned_acc_before", "final": "pruned_acc", "held_before": "holdout_acc_before",
                  "held": "holdout_acc", "trained": "acc_before_bn_recalibration"}
OUTPUT_NAMES = {"before": "output_error_before", "final": "output_error", "held_before": "holdout_output_error_before",
                "held": "holdout_output_error", "trained": "output_error_before_bn_recalibration"}


def fine_tuning_settings(cfg: TrainConfig, outputs: bool) -> TrainConfig:
    """cfg with optimizer 'auto' and lr None resolved for a run trained towards labels or towards outputs."""
    optimizer = AUTO_OPTIMIZER[outputs] if cfg.optimizer == "auto" else cfg.optimizer
    return replace(cfg, optimizer=optimizer, lr=FINETUNE_LR[optimizer] if cfg.lr is None else cfg.lr)


def finetune_run(run_dir: str | Path, cfg: TrainConfig = FINETUNE, out: str | Path | None = None,
                 data_dir: str | None = None, device: str = "auto", progress: bool = True, holdout: int = 0,
                 teacher_weights: str | None = None, dropout: float | None = FINETUNE_DROPOUT,
                 streaming: str = "auto", workers: int | None = None) -> dict:
    """holdout > 0: train on the rest of the training set, pick the best epoch on those held-out images (the same
    split as `prune --holdout`) and measure the test split once at the end, so lr and epochs can be chosen
    honestly; 0: the best epoch is picked on the test split. cfg.distill > 0: the dense model the run was pruned
    from (its checkpoint as report.json names it, or teacher_weights) is the teacher. dropout: the rate of every
    dropout layer while fine-tuning (None = the model's own; FINETUNE_DROPOUT by default, as the command's). cfg:
    FINETUNE, the command's settings, by default. streaming, workers: as for `prune` (a large image folder is
    streamed, with random resized crops and flips for training). cfg.optimizer 'auto' and cfg.lr None are resolved
    by what the run is trained towards (fine_tuning_settings)."""
    for name, value, ok, want in (("lr", cfg.lr, cfg.lr is None or cfg.lr > 0, "positive"),
                                  ("optimizer", cfg.optimizer, cfg.optimizer in ("auto", *OPTIMIZERS),
                                   f"one of auto, {', '.join(OPTIMIZERS)}"),
                                  ("batch-size", cfg.batch_size, cfg.batch_size >= 1, "at least 1"),
                                  ("epochs", cfg.epochs, cfg.epochs >= 1, "at least 1"),
                                  ("max-steps", cfg.max_steps, cfg.max_steps >= 0, ">= 0"),
                                  ("holdout", holdout, holdout >= 0, ">= 0"),
                                  ("workers", workers, workers is None or workers >= 0, ">= 0")):
        if not ok:  # checked before any loading, as prune checks its own
            raise UserError(f"--{name} must be {want}, got {value}")
    run = Path(run_dir)
    model, report, masks = load_run(run)
    # a model that is not a classifier, or images without labels: the dense model's outputs are the targets
    outputs = report.get("metric") == "output" or report.get("data_labels") == "none"
    # (a run measured by its outputs reads --teacher as its targets' model, distilled or not)
    unused = [flag for flag, given in (("--teacher", teacher_weights is not None and not outputs),
                                       ("--temperature", cfg.temperature != FINETUNE.temperature)) if given]
    if cfg.distill == 0 and unused:
        raise UserError(f"{unused[0]} is for distillation from the dense model: give --distill W (a weight in (0, 1]) "
                        "with it")
    cfg = fine_tuning_settings(cfg, outputs)
    if dropout is not None:  # a net with 90% of its weights gone has little to spare: the CIFAR CNN's dropout
        # (0.3-0.5) cost it 1 point of held-out accuracy in a one-epoch fine-tune
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.p = dropout
    quantized = load_tensors(run / "quant.pt", "quantization file") if (run / "quant.pt").is_file() else {}
    if not masks and not (report.get("structure") or {}).get("spec"):  # a channel-pruned run has no masks
        raise UserError(f"{run} has no masks.pt: nothing to keep")
    teacher = load_dense(report, teacher_weights) if cfg.distill > 0 or outputs else None
    out = ensure_writable(out or run / "finetune")
    dev = resolve_device(device)
    pre = run_preprocess(report)
    train, test = load_splits(report["dataset"], data_dir, pre, streaming, workers,
                              report.get("data_labels") or "classes")
    if test is None:  # a folder of unlabelled images without val/ or test/: the images prune held out
        train, test = holdout_split(train, int(str(report["eval_split"]).split()[1]))
    held = None
    if holdout:
        train, held = holdout_split(train, holdout)
    model.to(dev)
    names = OUTPUT_NAMES if outputs else ACCURACY_NAMES

    # class scores (a segmentation map's, say): the test split's share of positions with the dense top class too
    scores = outputs and (report.get("config") or {}).get("outputs", "scores") == "scores"
    agreement: dict[str, float | None] = {}

    def measure(data, which: str):  # which: pruned, held-out or fine-tuned (the progress bar's words)
        if outputs:
            compared = compare_outputs(model, teacher, data, dev, cfg.batch_size, progress, f"{which} output error",
                                       scores=scores and data is test)
            if data is test:
                agreement[which] = compared.get("agreement")
            return compared["error"]
        return evaluate(model, data, dev, cfg.batch_size, progress, f"{which} accuracy")
    before = measure(test, "pruned")
    held_before = measure(held, "held-out") if held else None
    latent = attach_grids(model, quantized)  # the optimizer moves the float weights under the grids
    result = train_model(model, train, held or test, cfg, dev, progress,
                         masks={latent.get(n, n): m for n, m in masks.items()}, teacher=teacher,
                         objective="outputs" if outputs else "labels",
                         resume=out / "resume.pt")  # an interrupted fine-tune goes on from its last epoch
    quantized = detach_grids(model, quantized)
    seconds = result["seconds"]  # (an interrupted run's earlier epochs included)
    # on the split the epoch was chosen on (held-out images with holdout)
    acc_trained = result["test_output_error" if outputs else "test_acc"]
    held_after = acc_trained if held else None
    bns = bn_modules(model)
    if bns:  # running averages over augmented batches (lr ≈ 0 cost the CIFAR CNN 1.2 points): re-estimate them on
        # clean training images, as the prune did (its calibration sample)
        x = calibration_set(train, report.get("nsamples", 1024), report.get("seed", 0))
        model.eval()
        with torch.no_grad():
            recalibrate(bns, model, (b.to(dev) for b in x.split(cfg.batch_size)))
        if held:
            held_after = measure(held, "held-out")
    # the test split, once; without holdout and BatchNorm the training loop has measured it already
    acc_final = measure(test, "fine-tuned") if held or bns or scores else acc_trained
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for name, keep in masks.items():  # the promise, checked once more on what is written
        if bool((state[name][~keep] != 0).any()):
            raise RuntimeError(f"{name}: a pruned weight became non-zero during fine-tuning")
    summary = report | {"finetune": {"from": str(run), "epochs": cfg.epochs, "max_steps": cfg.max_steps,
                                     "optimizer": cfg.optimizer, "lr": cfg.lr, "schedule": cfg.schedule,
                                     "warmup": cfg.warmup,
                                     "distill": cfg.distill, "dropout": dropout,
                                     "temperature": cfg.temperature if teacher else None,
                                     "batch_size": cfg.batch_size, "on_grids": bool(quantized),
                                     "best_epoch_chosen_on": f"holdout {holdout}" if held else "test",
                                     names["held_before"]: held_before, names["held"]: held_after,
                                     "bn_recalibrated": bool(bns),
                                     names["trained"]: acc_trained,  # on best_epoch_chosen_on
                                     "seconds": seconds, "resumed_from_epoch": result["resumed_from"],
                                     names["before"]: before, "history": result["history"]},
                        names["final"]: acc_final} | run_metadata(dev)
    if scores:  # the agreement measured with the error it goes with, before and after
        summary["finetune"]["output_agreement_before"] = agreement.get("pruned")
        summary["output_agreement"] = agreement.get("fine-tuned")
    atomic_save(state, out / "model.pt")
    if quantized:
        atomic_save(quantized, out / "quant.pt")
    shutil.copyfile(run / "masks.pt", out / "masks.pt")
    atomic_write_json(summary, out / "report.json")
    return summary


def format_finetune(r: dict) -> str:
    """A fine-tuned run's report.json in a line or two: before and after, on held-out images where it chose its epoch
    on them, then on the test split."""
    f, lines = r["finetune"], []
    held = str(f.get("best_epoch_chosen_on", "")).split()[-1]  # the held-out count, 'test' without one
    if f.get("holdout_acc") is not None:
        lines.append(f"held-out ({held} training images): {100 * f['holdout_acc_before']:.2f}% -> "
                     f"{100 * f['holdout_acc']:.2f}%")
    if f.get("holdout_output_error") is not None:
        lines.append(f"held-out ({held} training images): output error {f['holdout_output_error_before']:.4g} -> "
                     f"{f['holdout_output_error']:.4g}")
    dense = f"dense {100 * r['dense_acc']:.2f}%, " if r.get("dense_acc") is not None else ""
    agree = f"; the dense model's top class at {100 * f['output_agreement_before']:.2f}% -> " \
        f"{100 * r['output_agreement']:.2f}% of {r.get('output_agreement_over')}" \
        if f.get("output_agreement_before") is not None and r.get("output_agreement") is not None else ""
    measured = (f"output error against the dense model: pruned {f['output_error_before']:.4g} -> fine-tuned "
                f"{r['output_error']:.4g}{agree}") if "output_error_before" in f else \
        f"top-1 {dense}pruned {100 * f['pruned_acc_before']:.2f}% -> fine-tuned {100 * r['pruned_acc']:.2f}%"
    lines.append(f"{r['model']} {r['pattern']}: {measured} after {f['epochs']} epoch(s), {f['seconds']:.0f} s; "
                 f"{'channels' if (r.get('structure') or {}).get('spec') else 'masks'} kept"
                 f"{', weights on their grids' if f.get('on_grids') else ''}")
    return "\n".join(lines)
