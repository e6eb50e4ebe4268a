"""Trained models that are not classifiers, for the command line's `--metric output` and `--outputs`: small UNets
(benchmarks/conv_views_cnn.py) that remove Gaussian noise from MNIST digits (--task denoise, denoiser_mnist: an image
out) or score each pixel as background or its digit's class (--task segment, segmenter_mnist: 11 scores per pixel).

Writes a folder of noisy digits without labels (train/: the first N training digits, test/: the first M test digits,
8-bit PNGs, noise of standard deviation SIGMA on pixels in [0, 1], seeded) and trains the model on all 60,000 noisy
training digits (the same noise for the first N): to the clean digits by mean squared error, or to the pixel classes
(background where the clean pixel is below half its range, else the digit's label) by cross-entropy. The
checkpoint's .json holds its preprocessing (pixels in [0, 1]) and its test PSNR against the clean digits (noisy
input and output), or its test pixel accuracy.

    python benchmarks/noisy_mnist_denoiser.py --data-dir ../shared/data --images data/noisy_mnist \\
        --out checkpoints/denoiser_mnist.pt
    python benchmarks/noisy_mnist_denoiser.py --task segment --data-dir ../shared/data --images data/noisy_mnist \\
        --out checkpoints/segmenter_mnist.pt
    cnn-sparsegpt bench --config configs/bench_denoiser_mnist_test.yaml
    cnn-sparsegpt bench --config configs/bench_segmenter_mnist_test.yaml
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from cnn_sparsegpt import create_model, load_dataset
from cnn_sparsegpt.utils import atomic_save, atomic_write_json, git_commit

MODELS = {"denoise": "benchmarks/conv_views_cnn.py:denoiser_mnist",
          "segment": "benchmarks/conv_views_cnn.py:segmenter_mnist"}


def noisy(images: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) digits with Gaussian noise of `sigma` (pixels in [0, 1]), as uint8 again (what a PNG
    holds)."""
    g = torch.Generator().manual_seed(seed)
    x = images.float() / 255 + sigma * torch.randn(images.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def write_pngs(images: torch.Tensor, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img[0].numpy(), mode="L").save(folder / f"{i:05d}.png")


def rgb(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, H, W) -> float (N, 3, H, W) in [0, 1]: a gray PNG as the image folders read it (RGB)."""
    return (x.float() / 255).expand(-1, 3, -1, -1)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    return -10 * math.log10(float(F.mse_loss(pred.clamp(0, 1), target)))


def pixel_classes(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, H, W) targets: 10 (background) where a clean uint8 (N, 1, H, W) digit is below 128, else its label."""
    return torch.where(images[:, 0] >= 128, labels[:, None, None], torch.full_like(labels[:, None, None], 10))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="where MNIST lies (as prune's --data-dir)")
    ap.add_argument("--images", required=True, help="folder for the noisy digits (train/ and test/ of PNGs)")
    ap.add_argument("--out", required=True, help="checkpoint to write (and OUT.json)")
    ap.add_argument("--sigma", type=float, default=0.35, help="noise standard deviation, pixels in [0, 1]")
    ap.add_argument("--train-images", type=int, default=10000, help="noisy training digits written as PNGs")
    ap.add_argument("--test-images", type=int, default=2000, help="noisy test digits written as PNGs")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--task", choices=tuple(MODELS), default="denoise")
    args = ap.parse_args()
    segment = args.task == "segment"
    torch.manual_seed(0)
    train, test = load_dataset("mnist", True, args.data_dir), load_dataset("mnist", False, args.data_dir)
    train_noisy, test_noisy = noisy(train.images, args.sigma, 1), noisy(test.images, args.sigma, 2)
    images = Path(args.images)
    if not (images / "train").is_dir():  # (the same noise and images for both tasks)
        write_pngs(train_noisy[:args.train_images], images / "train")
        write_pngs(test_noisy[:args.test_images], images / "test")
    model = create_model(MODELS[args.task], num_classes=None)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * math.ceil(len(train_noisy) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_noisy), generator=torch.Generator().manual_seed(epoch))
        for idx in order.split(args.batch_size):
            out = model(rgb(train_noisy[idx]))
            loss = F.cross_entropy(out, pixel_classes(train.images[idx], train.labels[idx])) if segment else \
                F.mse_loss(out, rgb(train.images[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: last batch loss {loss.item():.5f}", flush=True)
    model.eval()
    n = args.test_images
    with torch.no_grad():
        clean, x = rgb(test.images[:n]), rgb(test_noisy[:n])
        out = torch.cat([model(part) for part in x.split(500)])
    atomic_save(model.state_dict(), args.out)
    if segment:
        task = "scoring each pixel of noisy MNIST digits as background or its digit's class"
        truth = pixel_classes(test.images[:n], test.labels[:n])
        measured = {"test_pixel_accuracy": float((out.argmax(1) == truth).float().mean())}
    else:
        task = "denoising MNIST digits"
        measured = {"test_psnr_noisy": psnr(x, clean), "test_psnr_denoised": psnr(out, clean)}
    meta = {"model": MODELS[args.task], "task": f"{task}, Gaussian noise sigma {args.sigma}",
            "preprocess": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "resize": None, "crop": None,
                           "source": "checkpoint .json (pixels in [0, 1])"},
            **measured, "test_images": n, "epochs": args.epochs, "seconds": time.perf_counter() - t0,
            "git_commit": git_commit()}
    atomic_write_json(meta, f"{args.out}.json")
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
