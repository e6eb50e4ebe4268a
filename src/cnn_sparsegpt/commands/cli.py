"""The `cnn-sparsegpt` command: prune, train, bench, plot, export, finetune, latency, show."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..pruning import dist
from ..utils import UserError


def _bool_flag(p, name: str, help_on: str, help_off: str) -> None:
    p.add_argument(f"--{name}", dest=name.replace("-", "_"), action="store_true", help=help_on)
    p.add_argument(f"--no-{name}", dest=name.replace("-", "_"), action="store_false", help=help_off)


class _Kwargs(argparse.Action):
    """KEY=VALUE ... into a dict, each VALUE read as a Python literal (64, 0.1, True, 'a', (1, 2)), else as text."""

    def __call__(self, parser, namespace, values, option_string=None):
        import ast

        out = {}
        for item in values:
            key, eq, text = item.partition("=")
            if not eq or not key.isidentifier():
                raise argparse.ArgumentError(self, f"takes KEY=VALUE pairs (width=64 dropout=0.1), got {item!r}")
            try:
                out[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                out[key] = text  # a bare word: a string
        setattr(namespace, self.dest, out)


class _Pairs(argparse.Action):
    """NAME=VALUE ... into a dict, split at the last '=' (a name may be a regex), each VALUE kept as text."""

    def __call__(self, parser, namespace, values, option_string=None):
        out = {}
        for item in values:
            key, eq, text = item.rpartition("=")
            if not eq or not key or not text:
                raise argparse.ArgumentError(self, f"takes {self.metavar} pairs (layer4.*=0.9 fc=2:4), got {item!r}")
            out[key] = text
        setattr(namespace, self.dest, out)


def _add_prune_flags(p: argparse.ArgumentParser) -> None:
    """One flag per field of PruneOptions and PruneConfig (config.py): names, help, choices and defaults come from
    the dataclasses, and every value is checked by them (one clear error), not by argparse."""
    import typing

    from ..pruning.config import PruneConfig
    from .options import PruneOptions, field_default, option_fields

    p.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    hints = typing.get_type_hints(PruneOptions) | typing.get_type_hints(PruneConfig)
    for name, f in option_fields().items():
        if name == "out":
            continue  # added by the command
        flag, meta, hint = name.replace("_", "-"), f.metadata, hints[name]
        default = field_default(f)
        choices = f" ({' | '.join(map(str, meta['choices']))})" if meta.get("choices") else ""
        help = f"{meta['help']}{choices}; default {default if default not in ('', (), None, {}) else 'not set'}"
        metavar = "{" + ",".join(map(str, meta["choices"])) + "}" if meta.get("choices") else None
        if bool in typing.get_args(hint) or hint is bool:
            _bool_flag(p, flag, help.replace("%", "%%"), f"the opposite of --{flag}")
            continue
        args = typing.get_args(hint)
        kind = next((t for t in (int, float, str) if hint is t or t in args), str)
        if hint is tuple:
            p.add_argument(f"--{flag}", nargs="+", help=help.replace("%", "%%"))
        elif hint is dict:
            p.add_argument(f"--{flag}", nargs="+", action=_Pairs if meta.get("pairs") else _Kwargs,
                           metavar=meta.get("pairs") or "KEY=VALUE", help=help.replace("%", "%%"))
        else:
            p.add_argument(f"--{flag}", type=kind, metavar=metavar, help=help.replace("%", "%%"))


def _cmd_prune(args: argparse.Namespace) -> int:
    from .options import load_yaml, merge_options
    from .pipeline import format_plan, format_report, plan_prune, run_prune

    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func", "quiet")}
    file_values = load_yaml(args.config) if getattr(args, "config", None) else {}
    dry = given.pop("dry_run", False)
    opts = merge_options(file_values, given)
    if not opts.model:
        raise UserError("--model is required (or 'model:' in the --config file)")
    if dry:
        print(format_plan(plan_prune(opts, progress=not args.quiet)))
        return 0
    result = run_prune(opts, progress=not args.quiet)
    if not dist.is_main(dist.process_group()):  # torchrun: rank 0 reports
        return 0
    print(format_report(result))
    extra = (", model.safetensors" if opts.save_safetensors else "") + (", quant.pt" if opts.config.wbits else "")
    print(f"wrote {opts.out}/model.pt{extra}, masks.pt, report.json")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.datasets import load_splits
    from ..models import create_model
    from .pipeline import dataset_for
    from .train import TrainConfig, train_model
    from ..utils import atomic_save, atomic_write_json, ensure_writable, resolve_device, run_metadata

    dataset = dataset_for(args.model, args.dataset)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0:
        raise UserError("--lr must be positive")
    device = resolve_device(args.device)
    out = Path(args.out)
    ensure_writable(out.parent)
    train, test = load_splits(dataset, args.data_dir)
    model = create_model(args.model, num_classes=max(train.num_classes, 2), kwargs=args.model_kwargs)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule=args.schedule,
                      seed=args.seed, max_steps=args.max_steps, label_smoothing=args.label_smoothing,
                      weight_decay=args.weight_decay, optimizer=args.optimizer)
    # an interrupted run goes on from its last finished epoch when the same command is run again
    result = train_model(model, train, test, cfg, device, progress=not args.quiet, resume=f"{out}.resume.pt")
    atomic_save(result["state_dict"], out)
    meta = {"model": args.model, "model_kwargs": args.model_kwargs, "dataset": dataset, "data_source": train.source,
            "normalization": {"mean": list(train.mean), "std": list(train.std)}, "epochs": args.epochs,
            "test_acc": result["test_acc"], "best_epoch": result["best_epoch"], "seconds": result["seconds"],
            "resumed_from_epoch": result["resumed_from"],
            "config": vars(cfg), "history": result["history"]} | run_metadata(device)
    atomic_write_json(meta, f"{out}.json")
    print(f"{args.model} on {dataset}: test accuracy {100 * result['test_acc']:.2f}% (epoch {result['best_epoch']}), "
          f"{result['seconds']:.0f} s; wrote {out} and {out}.json")
    return 0


def _add_train_parser(sub) -> None:
    from ..models import list_models

    from .train import OPTIMIZERS, TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a baseline model and write its checkpoint (+ .json metadata)")
    p.add_argument("--model", required=True, help=f"model: {', '.join(list_models())}, torchvision:NAME, timm:NAME, "
                   "or your own as FILE.py:NAME (a function or class that builds it)")
    p.add_argument("--model-kwargs", nargs="+", action=_Kwargs, default={}, metavar="KEY=VALUE",
                   help="keyword arguments for the model's builder (values read as Python literals: width=64 "
                   "dropout=0.1); the checkpoint's .json keeps them, and prune reads them from there")
    p.add_argument("--dataset", help="mnist, cifar10, or an ImageFolder folder/.tar.gz (default: the model's)")
    p.add_argument("--data-dir", help="data root (default: $CNN_SPARSEGPT_DATA, else ~/.cache/cnn_sparsegpt/data)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the training set (default {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default=d.optimizer,
                   help="sgd (Nesterov momentum, default) or adamw")
    p.add_argument("--schedule", choices=["onecycle", "cosine"], default=d.schedule, help="learning-rate schedule")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="not applied to norms and biases")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help=f"default {d.label_smoothing}")
    p.add_argument("--seed", type=int, default=0, help="initialization and data order")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = no limit)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", required=True, help="checkpoint path; metadata goes to PATH.json")
    p.set_defaults(func=_cmd_train)


def _add_finetune_parser(sub) -> None:
    from .train import FINETUNE, FINETUNE_DROPOUT, FINETUNE_LR, OPTIMIZERS

    p = sub.add_parser("finetune", help="train a pruned run for a few epochs with its masks kept exactly (and a "
                       "quantized run's weights on their grids, by a straight-through estimator)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a `prune` run (model.pt, masks.pt)")
    p.add_argument("--epochs", type=int, default=FINETUNE.epochs,
                   help=f"epochs over the training set (default {FINETUNE.epochs})")
    p.add_argument("--lr", type=float, default=FINETUNE.lr,
                   help=f"peak learning rate of the cosine schedule (default: {FINETUNE_LR['sgd']:g} with sgd, best "
                   "or close to it on held-out images for the CIFAR CNN, ResNet-18 and ResNet-20 at 90%%, one epoch; "
                   f"{FINETUNE_LR['adamw']:g} with adamw, best on held-out images for a denoiser at 90%%; see "
                   "docs/OPTIONS.md)")
    p.add_argument("--optimizer", choices=["auto", *OPTIMIZERS], default=FINETUNE.optimizer,
                   help="auto (default): sgd (Nesterov momentum) for a run measured by top-1, adamw for one measured "
                   "by its outputs (a model that is not a classifier, images without labels)")
    p.add_argument("--batch-size", type=int, default=FINETUNE.batch_size, help=f"default {FINETUNE.batch_size}")
    p.add_argument("--data-dir", help="data root (default $CNN_SPARSEGPT_DATA, else ~/.cache/cnn_sparsegpt/data)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", help="output folder (default RUN_DIR/finetune): model.pt, masks.pt, report.json")
    p.add_argument("--warmup", type=float, default=FINETUNE.warmup,
                   help="fraction of the steps over which the lr ramps up linearly before the cosine decay "
                   "(default 0)")
    p.add_argument("--holdout", type=int, default=0,
                   help="train on all but N training images and pick the best epoch on those N (the split of "
                   "`prune --holdout`); the test split is then measured once. Use it to choose --lr/--epochs "
                   "(default 0: the best epoch is picked on the test split)")
    p.add_argument("--distill", type=float, default=FINETUNE.distill,
                   help="weight in [0, 1] of knowledge distillation from the dense model the run was pruned from "
                   "(its outputs as soft targets); default 0 (off)")
    p.add_argument("--temperature", type=float, default=FINETUNE.temperature,
                   help=f"distillation temperature (default {FINETUNE.temperature:g})")
    p.add_argument("--teacher", help="dense checkpoint for --distill (default: the run's --weights, as report.json "
                   "names it)")
    p.add_argument("--dropout", type=dropout_rate, default=FINETUNE_DROPOUT,
                   help="rate of every dropout layer while fine-tuning, or 'own' to keep the model's (default 0: "
                   "on held-out images, one epoch, it gained 1.2 points for the 90%%-sparse CIFAR CNN, 0.02 for "
                   "MNIST's)")
    p.add_argument("--streaming", choices=["auto", "on", "off"], default="auto",
                   help="image folders: stream from the files (training images get random resized crops and "
                   "flips), decode all into memory once, or choose by size (auto, default; as for prune)")
    p.add_argument("--workers", type=int, help="image-decoding processes when streaming (default min(8, cores))")
    p.add_argument("--max-steps", type=int, default=FINETUNE.max_steps,
                   help="stop after this many steps (0 = no limit)")
    p.set_defaults(func=_cmd_finetune)


def dropout_rate(text: str) -> float | None:
    """A --dropout value: a rate, or 'own' (None) for the model's own rates."""
    if text == "own":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a rate in [0, 1) or 'own', got '{text}'") from None


def _cmd_finetune(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .finetune import finetune_run, format_finetune
    from .train import FINETUNE

    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")
    if not 0 <= args.warmup < 1:
        raise UserError(f"--warmup is a fraction of the steps in [0, 1), got {args.warmup}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise UserError(f"--dropout is a rate in [0, 1), got {args.dropout}")
    if not 0 <= args.distill <= 1 or args.temperature <= 0:
        raise UserError(f"--distill is a weight in [0, 1] and --temperature > 0, got {args.distill}, "
                        f"{args.temperature}")
    cfg = replace(FINETUNE, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer,
                  max_steps=args.max_steps, warmup=args.warmup, distill=args.distill, temperature=args.temperature)
    r = finetune_run(args.run_dir, cfg, args.out, args.data_dir, args.device, progress=not args.quiet,
                     holdout=args.holdout, teacher_weights=args.teacher, dropout=args.dropout,
                     streaming=args.streaming, workers=args.workers)
    print(format_finetune(r))
    f = r["finetune"]
    extra = ", quant.pt" if f.get("on_grids") else ""
    print(f"wrote {args.out or str(args.run_dir) + '/finetune'}/model.pt, masks.pt{extra}, report.json")
    return 0


def _add_export_parser(sub) -> None:
    from .export import add_run_data_arguments

    p = sub.add_parser("export", help="fold BatchNorm into the convs of a pruned run and write ONNX, safetensors "
                       "and/or a compressed file")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a `prune` run (model.pt, report.json)")
    p.add_argument("--onnx", metavar="PATH", help="write an ONNX model (checked in onnxruntime against PyTorch "
                   "within 1e-4; needs the extra: pip install 'cnn-sparsegpt[export]')")
    p.add_argument("--int8", metavar="PATH", help="write an INT8 ONNX model for ONNX Runtime (QDQ: int8 weights, "
                   "one symmetric scale per output channel, zeros kept; uint8 activations whose ranges come from the "
                   "run's calibration images), and measure its top-1 against the float model's on the run's "
                   "evaluation images; needs the run's data (--data-dir) and the [export] extra")
    add_run_data_arguments(p, "--int8")
    p.add_argument("--safetensors", metavar="PATH", help="write the folded weights as safetensors")
    p.add_argument("--compressed", metavar="PATH", help="write the folded weights compressed (.safetensors: "
                   "bitmasks of the non-zeros, their values or, for a --wbits run, their integer codes packed to "
                   "the bit width); cnn_sparsegpt.load_compressed(PATH) restores them bit for bit")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--input-shape", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="one input's shape (default: what the run recorded, else the dataset's)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import RunData, export_run, format_export, run_data_options

    out = export_run(args.run_dir, args.onnx, args.safetensors, args.input_shape, args.opset,
                     compressed_path=args.compressed, int8_path=args.int8,
                     int8=run_data_options(args, "--int8 PATH", args.int8 is not None) or RunData())
    print(format_export(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnn-sparsegpt", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", help="prune a trained model one-shot and write model.pt, masks.pt, report.json",
                       argument_default=argparse.SUPPRESS)
    _add_prune_flags(p)
    p.add_argument("--out", help="output folder (default runs/prune)")
    p.add_argument("--dry-run", action="store_true", help="list the layers the prune would prune and why the others "
                   "stay dense (model, weights and data loaded, two images through the prune's own code; nothing "
                   "pruned or written), then stop; with --structure channels, each group of tied channels, how many "
                   "may go and why none of the others may")
    p.set_defaults(func=_cmd_prune)

    _add_train_parser(sub)
    _add_export_parser(sub)
    _add_finetune_parser(sub)
    try:
        from .bench import add_bench_parser
        from .latency import add_latency_parser
        from .plot import add_plot_parser
        from .show import add_show_parser
    except ImportError:  # pragma: no cover
        pass
    else:
        add_bench_parser(sub)
        add_latency_parser(sub)
        add_plot_parser(sub)
        add_show_parser(sub)
    for command in sub.choices.values():  # `cnn-sparsegpt bench -q` as well as `cnn-sparsegpt -q bench`
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return parser


_WARNED: set[str] = set()  # the lines a command printed: a warning two stages of a prune give is printed once


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    if str(message) not in _WARNED:
        _WARNED.add(str(message))
        print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _warning_line
    _WARNED.clear()  # (per command)
    try:
        if dist.launched() and args.command not in ("prune", "bench"):
            raise UserError(f"`{args.command}` runs in one process: start it without torchrun")
        return args.func(args)
    except UserError as e:
        where = f"[rank {os.environ.get('RANK', '?')}] " if dist.launched() else ""
        print(f"error: {where}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        dist.close()


if __name__ == "__main__":
    sys.exit(main())
