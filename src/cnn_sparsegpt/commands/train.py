"""The one training and evaluation loop, shared by every model."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..pruning import dist
from ..pruning.heap import reuse_freed_memory
from ..pruning.masks_kept import keep_masks
from ..pruning.output_kl import relative_squared_error, values
from ..pruning.output_kl import scores as output_scores
from ..data.datasets import ImageSet
from ..data.folders import FolderSet
from ..utils import UserError, as_module, atomic_save, classifier_logits, evaluation_mode, load_tensors


@dataclass
class TrainConfig:
    epochs: int = 2
    batch_size: int = 128
    lr: float | None = 0.05  # peak learning rate of the schedule (finetune_run: None = the optimizer's default)
    optimizer: str = "sgd"  # sgd (Nesterov momentum) | adamw; finetune_run also takes 'auto' (by the objective)
    momentum: float = 0.9  # Nesterov
    weight_decay: float = 5e-4  # not applied to norms and biases
    label_smoothing: float = 0.1
    schedule: str = "onecycle"  # onecycle | cosine
    seed: int = 0
    max_steps: int = 0  # stop after this many steps (0 = no limit; for smoke tests)
    warmup: float = 0.0  # cosine schedule: fraction of the steps over which lr ramps up linearly from 0
    distill: float = 0.0  # weight of a teacher's softened outputs in the loss (knowledge distillation; 0 = off)
    temperature: float = 4.0  # softens teacher and student alike in the distillation term


def _shard(data, device, batch_size: int, progress: bool, desc: str, process_group):
    """The (images, labels) batches of `data` this process evaluates: every world-th image under torchrun. data: an
    ImageSet or FolderSet, a pair (images, labels) of tensors, or a tensor of model-ready images (labels None)."""
    pair = isinstance(data, (tuple, list)) and len(data) == 2 and all(map(torch.is_tensor, data))
    tensors = tuple(data) if pair else (data,) if torch.is_tensor(data) else None  # images, and labels in a pair
    if tensors is None and not hasattr(data, "batches"):
        raise UserError(f"data must be an ImageSet (load_dataset), a pair (images, labels) of tensors or a tensor of "
                        f"images, got {type(data).__name__}")
    if pair and len(data[0]) != len(data[1]):
        raise UserError(f"{len(data[0])} images and {len(data[1])} labels: give one label per image")
    world = dist.world(process_group)
    if world > 1:
        share = torch.arange(dist.rank(process_group), len(tensors[0] if tensors else data), world)
        if tensors:
            tensors = tuple(t[share] for t in tensors)
        else:
            data = data.subset(share)
    if tensors:
        n = len(tensors[0])
        batches = ((parts[0].to(device), parts[1].to(device) if pair else None)
                   for parts in zip(*(t.split(batch_size) for t in tensors)))
    else:
        n = len(data)
        batches = data.batches(batch_size, device)
    # freed activations reused, not faulted in afresh per batch (pruning/heap.py): ResNet-18 on CIFAR-10's test split
    # 56.2 / 55.8 -> 39.1 / 39.6 s on this project's CPU, peak RSS +11-18% (benchmarks/heap_reuse.py --evaluate)
    with reuse_freed_memory(torch.device(device).type == "cpu"):
        yield from tqdm(batches, total=-(-n // batch_size), desc=desc, unit="batch", disable=not progress,
                        leave=False)


def _logits(out) -> torch.Tensor:
    """A classifier's output as its logits (a tensor as it is; a mapping's 'logits': Hugging Face's models)."""
    logits = out if isinstance(out, torch.Tensor) else classifier_logits(out)
    if logits is None:
        raise UserError(f"top-1 needs a classifier's (N, classes) logits, and this model returns {type(out).__name__}"
                        " without a 'logits' entry: measure it by its outputs (--metric output)")
    return logits


@torch.no_grad()
def evaluate(model: nn.Module, data, device: torch.device | str = "cpu", batch_size: int = 500,
             progress: bool = True, desc: str = "evaluate", process_group=None) -> float:
    """Top-1 accuracy as a fraction in [0, 1], over an ImageSet, a streamed FolderSet or a pair (images, labels) of
    tensors. With a process group (torchrun) each process evaluates every world-th image and the counts are added."""
    if torch.is_tensor(data):
        raise UserError("evaluate needs labels: give (images, labels), or an ImageSet (load_dataset); output_error "
                        "compares a model's outputs with a reference's on images alone")
    model = as_module(model)
    correct = n = 0
    with evaluation_mode(model):
        for x, y in _shard(data, device, batch_size, progress, desc, process_group):
            correct += (_logits(model(x)).argmax(1) == y).sum().item()
            n += len(y)
    correct, n = dist.sum_counts(correct, n, group=process_group)
    return correct / max(n, 1)


@torch.no_grad()
def compare_outputs(model: nn.Module, reference: nn.Module, data, device: torch.device | str = "cpu",
                    batch_size: int = 500, progress: bool = True, desc: str = "output error",
                    process_group=None, scores: bool = False) -> dict:
    """How far `model`'s outputs are from `reference`'s (the dense model's) on the images of `data` (an ImageSet, a
    FolderSet or a tensor of model-ready images; labels unread). 'error': Σ‖y − y_ref‖² / Σ‖y_ref‖² over every
    image and every floating output tensor of a batch's shape (output_kl.values: a dict's or a tuple's too), so 0 is
    the same outputs and 1 an error as large as the outputs themselves. With `scores` (the outputs are class scores:
    a classifier's logits, a segmentation map's), 'agreement': the fraction of images and positions whose highest
    score (dim 1 of the first scores tensor, output_kl.scores) is the reference's class, and 'agreement_over' what
    it counts (images, or positions of per-pixel scores); else None. Any model; torchrun as in `evaluate`."""
    err = ref = same = positions = 0.0
    over = None  # what agreement counts: images (a classifier's scores) or positions (per-pixel scores)
    model, reference = as_module(model), as_module(reference, "the reference model")
    with evaluation_mode(model, reference):
        for x, _ in _shard(data, device, batch_size, progress, desc, process_group):
            out, out_ref = model(x), reference(x)
            y, r = values(out, len(x)), values(out_ref, len(x))  # every output tensor, side by side
            if r is None:
                raise UserError(f"{type(reference).__name__}'s output holds no floating tensor with a row per image: "
                                "there is nothing to compare (a detector's boxes after NMS differ in number from "
                                "image to image: prune and measure its backbone, see the README)")
            if y is None or y.shape != r.shape:
                raise UserError(f"{type(model).__name__}'s outputs ({None if y is None else list(y.shape)}) are not "
                                f"the shape of the dense model's ({list(r.shape)}): they cannot be compared")
            y, r = y.double(), r.double()
            err += float((y - r).square().sum())
            ref += float(r.square().sum())
            s_ref = output_scores(out_ref, len(x)) if scores else None
            if s_ref is not None and s_ref.shape[1] > 1:
                same += float((output_scores(out, len(x)).argmax(1) == s_ref.argmax(1)).sum())
                positions += s_ref[:, 0].numel()
                over = "images" if s_ref.ndim == 2 else "positions"
    err, ref, same, positions = dist.sum_counts(err, ref, same, positions, group=process_group)
    return {"error": err / ref if ref > 0 else (math.inf if err > 0 else 0.0),
            "agreement": same / positions if positions else None, "agreement_over": over}


def output_error(model: nn.Module, reference: nn.Module, data, device: torch.device | str = "cpu",
                 batch_size: int = 500, progress: bool = True, desc: str = "output error",
                 process_group=None) -> float:
    """compare_outputs' 'error': Σ‖y − y_ref‖² / Σ‖y_ref‖² over the images of `data` and every output tensor."""
    return compare_outputs(model, reference, data, device, batch_size, progress, desc, process_group)["error"]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)  # norms and biases are 1-d
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# the optimizers by name: each builds torch's from the parameter groups (decay on weights, none on norms and biases)
OPTIMIZERS = {
    "sgd": lambda groups, cfg: torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True),
    "adamw": lambda groups, cfg: torch.optim.AdamW(groups, lr=cfg.lr),
}
# fine-tuning's optimizer 'auto' by what a run is trained towards: labels (SGD) or the dense model's outputs (AdamW:
# chosen on held-out images for the denoiser at 90%, 34% lower output error where SGD's best lr gained 1.5%; SGD kept
# for classifiers: no AdamW lr beat it on both ResNets; docs/OPTIONS.md)
AUTO_OPTIMIZER = {False: "sgd", True: "adamw"}
# fine-tuning's lr by optimizer where none is given: SGD's chosen on held-out images for the CIFAR CNN and the ResNets
# at 90%, AdamW's for the denoiser (of 3e-3 to 1e-4)
FINETUNE_LR = {"sgd": 0.03, "adamw": 1e-3}
# `finetune`'s settings where none are given (the command's flags and finetune_run's defaults): one epoch of a cosine
# schedule, the optimizer and lr by the run (AUTO_OPTIMIZER, FINETUNE_LR)
FINETUNE = TrainConfig(epochs=1, lr=None, optimizer="auto", schedule="cosine")
# and the rate of every dropout layer while fine-tuning: off (why: finetune_run, where it is applied)
FINETUNE_DROPOUT = 0.0


def training_structure(model: nn.Module) -> None:
    """`model` in training mode but for what makes training random or batch-dependent (dropout, drop-path,
    BatchNorm and other running statistics), which stays as in evaluation: the outputs a training forward returns,
    deterministic, for a teacher whose student trains."""
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)) or \
                "drop" in type(m).__name__.lower():
            m.eval()


def train_model(model: nn.Module, train_set: ImageSet | FolderSet, test_set: ImageSet | FolderSet, cfg: TrainConfig,
                device: torch.device | str = "cpu", progress: bool = True,
                masks: dict[str, torch.Tensor] | None = None, teacher: nn.Module | None = None,
                objective: str = "labels", resume: str | Path | None = None) -> dict:
    """Train in place; the weights of the best epoch (by accuracy on test_set, which is held-out training images
    when settings are being chosen) are loaded back at the end.
    masks (parameter name → True = kept): pruned weights are zeroed before training and after every step,
    so the sparsity pattern is kept exactly (fine-tuning a pruned model). teacher (with cfg.distill > 0): its
    outputs on the same augmented batch are soft targets (Hinton et al. 2015), e.g. the dense model for its pruned copy.
    objective='outputs' (a model that is not a classifier, images without labels): the teacher's outputs are the
    targets, relative squared error of every output tensor, and the best epoch has the lowest output error against
    the teacher on test_set; no label is read.

    resume: a file where the training state is written after every epoch (atomically), so that an interrupted
    run called again with the same file and settings goes on from its last finished epoch, as if never stopped
    (the batches' order and augmentation too); removed when training ends.

    Returns {'test_acc' (labels) or 'test_output_error' (outputs), 'best_epoch', 'history', 'seconds',
    'state_dict', 'resumed_from' (the epoch a resumed run went on from, else 0)}.
    """
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    # faster 2-D convolutions on CPU (a model with 3-D convs, whose weights torch cannot lay out so, stays as it is)
    channels_last = device.type == "cpu" and all(p.ndim != 5 for p in model.parameters())
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loader = train_set.loader(cfg.batch_size, device, seed=cfg.seed, channels_last=channels_last)
    if cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer '{cfg.optimizer}': one of {', '.join(OPTIMIZERS)}")
    opt = OPTIMIZERS[cfg.optimizer](_param_groups(model, cfg.weight_decay), cfg)
    total = cfg.epochs * len(loader)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 1), pct_start=0.25)
    else:
        ramp = int(cfg.warmup * total)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / (ramp + 1) if s < ramp
            else 0.5 * (1 + math.cos(math.pi * (s - ramp) / max(total - ramp, 1))))
    keep_masks(model, masks or {}, opt)  # pruned weights zero before training and after every step
    ce = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if teacher is not None:
        teacher.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format).eval()
    if objective == "outputs":
        if teacher is None:
            raise UserError("training towards a teacher's outputs needs the teacher (the dense model)")

        def loss_fn(out, x, y):
            got = values(out)
            with torch.no_grad():
                target = values(teacher(x))
                if target.shape != got.shape:  # a model whose training forward returns other outputs (a YOLO head's
                    training_structure(teacher)  # raw maps): the teacher's training forward, statistics as they are
                    target = values(teacher(x))
            if target.shape != got.shape:
                raise UserError(f"{type(model).__name__} returns other outputs in training than in evaluation "
                                f"({list(got.shape)} against {list(target.shape)}): it cannot be trained towards "
                                "the dense model's outputs")
            return relative_squared_error(target, got)

        def score() -> tuple[float, dict]:  # higher is better; and what the history records
            error = output_error(model, teacher, test_set, device, progress=progress)
            return -error, {"test_output_error": error}
    else:
        def score() -> tuple[float, dict]:
            acc = evaluate(model, test_set, device, progress=progress)
            return acc, {"test_acc": acc}

        if teacher is not None and cfg.distill > 0:
            a, t = cfg.distill, cfg.temperature

            def loss_fn(out, x, y):  # t² keeps the soft term's gradients on the scale of the hard one's
                with torch.no_grad():
                    soft = F.log_softmax(_logits(teacher(x)) / t, 1)
                out = _logits(out)
                kd = F.kl_div(F.log_softmax(out / t, 1), soft, reduction="batchmean", log_target=True)
                return (1 - a) * ce(out, y) + a * t * t * kd
        else:
            def loss_fn(out, x, y):
                return ce(_logits(out), y)
    best, best_state, best_epoch, history, step = -math.inf, None, 0, [], 0
    t0 = time.perf_counter()
    done, settings = 0, asdict(cfg) | {"objective": objective, "train_images": len(train_set)}
    if resume is not None and Path(resume).is_file():
        saved = load_tensors(resume, "training state")
        if saved.get("settings") != settings:
            raise UserError(f"{resume} holds an interrupted training run with other settings: run with those, or "
                            "delete the file to start afresh")
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError:
            raise UserError(f"{resume} holds an interrupted training run of another model: delete the file to start "
                            "afresh") from None
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        loader.load_state_dict(saved["loader"])
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        done, step, history = saved["epoch"], saved["step"], saved["history"]
        best, best_epoch, best_state = saved["best"], saved["best_epoch"], saved["best_state"]
        t0 -= saved["seconds"]
        if progress:
            tqdm.write(f"resuming from epoch {done} of {cfg.epochs} ({resume})")
    try:
        for epoch in range(done + 1, cfg.epochs + 1):
            model.train()
            bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=not progress, leave=False)
            running = 0.0
            for x, y in bar:
                loss = loss_fn(model(x), x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                value = loss.item()
                if not math.isfinite(value):
                    raise UserError(f"training diverged at step {step} (loss {value}): lower --lr")
                running = 0.9 * running + 0.1 * value if step > 1 else value
                bar.set_postfix(loss=f"{running:.3f}")
                if step >= total:
                    break
            value, record = score()
            history.append({"epoch": epoch, "train_loss": running} | record)
            if progress:
                tqdm.write(f"epoch {epoch}: loss {running:.4f}, " + ", ".join(f"{k.replace('_', ' ')} {v:.4g}"
                                                                             for k, v in record.items()))
            if value > best:  # a real copy: the live tensors keep changing
                best, best_epoch = value, epoch
                best_state = {k: v.detach().to("cpu", copy=True).contiguous()
                              for k, v in model.state_dict().items()}
            if resume is not None and step < total and epoch < cfg.epochs:
                atomic_save({"settings": settings, "epoch": epoch, "step": step, "history": history, "best": best,
                             "best_epoch": best_epoch, "best_state": best_state, "model": model.state_dict(),
                             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                             "loader": loader.state_dict(), "rng": torch.get_rng_state(),
                             "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                             "seconds": time.perf_counter() - t0}, resume)
            if step >= total:
                break
    except KeyboardInterrupt:
        if resume is not None and Path(resume).is_file():
            print(f"the finished epochs are kept in {resume}: the same command goes on from there", file=sys.stderr)
        raise
    if resume is not None:
        Path(resume).unlink(missing_ok=True)
    model.load_state_dict(best_state)
    model.to(memory_format=torch.contiguous_format)
    measured = {"test_output_error": -best} if objective == "outputs" else {"test_acc": best}
    return measured | {"best_epoch": best_epoch, "history": history, "seconds": time.perf_counter() - t0,
                       "state_dict": best_state, "resumed_from": done}
