"""Does every torchvision classifier prune? Each model with random weights (seed 0, 10 classes) on a few random images
is pruned 2:4 and by whole channels (`structure="channels"`, keep_macs 0.6) with the library's defaults, then run
once: a row per (model, prune) with its status (ok, or the error's type and message), seconds, and for channels the
multiply-adds kept and why any channel group was left in place. Rows are written as they come and a second run
skips the ones already in the file.

    python benchmarks/architecture_sweep.py --json experiments/architecture_sweep.json
    python benchmarks/architecture_sweep.py --timm --json experiments/architecture_sweep_timm.json
    python benchmarks/architecture_sweep.py --segmentation --kinds 2:4 0.5 channels \
        --json experiments/architecture_sweep_segmentation.json
    python benchmarks/architecture_sweep.py --video --kinds 2:4 0.5 channels \
        --json experiments/architecture_sweep_video.json
    python benchmarks/architecture_sweep.py --models alexnet timm:dla34 --kinds channels --json /tmp/x.json

Random weights say nothing of accuracy: this finds the architectures a user's model could break on (graph patterns
the channel dependency graph or the N:M solvers do not handle) and how long a prune takes on each at small size.
By default one model of each family (FAMILIES: the larger variants have the same graph patterns and take minutes
each here); --all sweeps every torchvision classifier but the transformers (vit, swin, maxvit); --timm sweeps
TIMM_FAMILIES, timm's graph families beyond torchvision's, built as `--model timm:NAME` builds them; --segmentation
torchvision's segmentation models (SEGMENTATION: a dict of per-pixel scores, FCN's with its auxiliary head too);
--video its 3-D CNN video classifiers (VIDEO: Conv3d, pruned through their Conv2d views, pruning/conv_views.py).
2:4 and 0.5 rows say which layers stayed dense and why. Seconds are wall-clock on a shared machine: a rough guide,
not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch
import torchvision

from cnn_sparsegpt import create_model, prune_model
from cnn_sparsegpt.utils import atomic_write_json, git_commit, output_tensors, run_metadata

FAMILIES = ("alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
            "inception_v3", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_400mf",
            "regnet_y_400mf", "resnet18", "resnet50", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0",
            "squeezenet1_1", "vgg11_bn", "wide_resnet50_2")  # one model of each graph family (the default)
SKIP = ("vit_", "swin", "maxvit")  # with --all: transformers, no convolutions to prune in our sense
TIMM_FAMILIES = ("convmixer_768_32", "convnext_atto", "cs3darknet_s", "cspdarknet53", "cspresnet50", "densenet121",
                 "dla34", "dm_nfnet_f0", "dpn68", "ecaresnet50d",
                 "edgenext_xx_small", "efficientnet_b0", "efficientvit_b0", "fastvit_t8", "fbnetv3_b", "gernet_s",
                 "ghostnet_100", "ghostnetv2_100", "hardcorenas_a", "hrnet_w18_small",
                 "inception_next_tiny", "inception_resnet_v2", "inception_v4", "lambda_resnet26t", "lcnet_050",
                 "legacy_xception", "mixnet_s", "mobilenetv3_large_100", "mobilenetv4_conv_small", "mobileone_s0",
                 "mobilevit_xxs", "nf_resnet50", "poolformer_s12", "rdnet_tiny", "regnety_002", "regnetz_b16",
                 "repghostnet_050", "repvgg_a0", "res2net50_26w_4s", "resnest14d", "resnet50d", "resnetv2_50",
                 "rexnet_100", "selecsls42b", "seresnext26d_32x4d", "skresnet18", "starnet_s1", "tf_efficientnet_b0",
                 "tresnet_m", "xception41")  # --timm: timm's graph families beyond torchvision's (a small variant each;
# not the attention hybrids whose attention is sized for 256 pixels: bat_resnext, botnet, halonet)
SIZES = {"inception_v3": 96, "googlenet": 96, "timm:inception_v4": 96, "timm:inception_resnet_v2": 96}  # stems
# that need more than 64 pixels
SEGMENTATION = {"deeplabv3_mobilenet_v3_large": {}, "deeplabv3_resnet50": {}, "fcn_resnet50": {"aux_loss": True},
                "lraspp_mobilenet_v3_large": {}}  # --segmentation: name -> what torchvision builds it with
VIDEO = ("mc3_18", "r2plus1d_18", "r3d_18")  # --video: torchvision's 3-D CNN video classifiers (Conv3d), on random
# clips of 8 frames of 56x56 (not s3d, whose last pooling needs 224 pixels; not the video transformers)
PRUNES = {"2:4": {"nm": "2:4"}, "0.5": {"sparsity": 0.5},  # 0.5: the default's dp allocation measures output KLs
          "channels": {"structure": "channels", "keep_macs": 0.6}}


def one(name: str, kind: str, nsamples: int) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name.startswith("timm:"):  # as `--model timm:NAME` builds it
                model = create_model(name, num_classes=10).eval()
            elif name in SEGMENTATION:
                model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=10,
                                                     **SEGMENTATION[name]).eval()
            else:
                model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
            x = torch.randn(nsamples, 3, 8, 56, 56) if name in VIDEO else \
                torch.randn(nsamples, 3, SIZES.get(name, 64), SIZES.get(name, 64))
            t0 = time.perf_counter()
            rep = prune_model(model, x, progress=False, batch_size=nsamples, **PRUNES[kind])
            with torch.no_grad():
                y = output_tensors(model(x))
    except Exception as e:  # the row records it: the sweep is looking for exactly these
        return {"status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}",
                "seconds": time.perf_counter() - t0}
    row = {"status": "ok" if all(torch.isfinite(t).all() for t in y) else "non-finite output",
           "seconds": time.perf_counter() - t0}
    if kind != "channels":  # what stayed dense, and why (by reason, with how many layers)
        left = [r.reason for r in rep.layers if r.skipped]
        row |= {"layers_pruned": sum(not r.skipped for r in rep.layers),
                "layers_left": {k: left.count(k) for k in sorted(set(left))}, "sparsity": rep.sparsity}
    else:
        dense, kept = rep.structure["macs"]
        groups = rep.structure["groups"]
        row |= {"macs_kept": kept / dense, "timings": rep.timings, "groups": len(groups),
                "groups_fixed": sorted({g["fixed"] for g in groups if g["fixed"]})}  # channels left in place, why
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(FAMILIES), help="torchvision model names, or timm:NAME")
    p.add_argument("--all", action="store_true", help="every torchvision classifier but the transformers instead")
    p.add_argument("--timm", action="store_true", help="timm's families (TIMM_FAMILIES) instead")
    p.add_argument("--segmentation", action="store_true", help="torchvision's segmentation models instead")
    p.add_argument("--video", action="store_true", help="torchvision's 3-D CNN video classifiers instead")
    p.add_argument("--kinds", nargs="+", default=["2:4", "channels"], choices=list(PRUNES))
    p.add_argument("--nsamples", type=int, default=8, help="random calibration images")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    names = [n for n in torchvision.models.list_models(module=torchvision.models)
             if not any(s in n for s in SKIP)] if args.all else args.models
    names = [f"timm:{n}" for n in TIMM_FAMILIES] if args.timm else list(SEGMENTATION) if args.segmentation else \
        list(VIDEO) if args.video else names
    rows = json.load(open(args.json))["rows"] if os.path.exists(args.json) else []
    done = {(r["model"], r["kind"]) for r in rows}
    commit = git_commit()  # the code this process runs (HEAD may move while it runs)
    for name in names:
        for kind in args.kinds:
            if (name, kind) in done:
                continue
            row = {"model": name, "kind": kind, "nsamples": args.nsamples, "git_commit": commit} | \
                one(name, kind, args.nsamples)
            rows.append(row)
            print(f"{name:24s} {kind:9s} {row['status']:6s} {row['seconds']:7.1f} s", row.get("error", ""),
                  flush=True)
            atomic_write_json({"rows": rows} | run_metadata(torch.device("cpu")), args.json)


if __name__ == "__main__":
    main()
