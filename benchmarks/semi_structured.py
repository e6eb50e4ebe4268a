"""What 2:4 sparsity buys on a GPU's sparse tensor cores, measured with PyTorch's own kernels
(`torch.sparse.to_sparse_semi_structured`): ResNet-50's 1×1 convs (run as Linear over pixels) and its fc,
per layer and end to end, in float16. Needs a CUDA GPU of compute capability ≥ 8.0.

    python benchmarks/semi_structured.py --json experiments/gpu/semi_structured.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn


def two_four(w: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4 along the input dimension (the last one), the layout of our N:M masks."""
    g = w.reshape(-1, 4)
    drop = g.abs().topk(2, dim=1, largest=False).indices
    return g.scatter(1, drop, 0).reshape(w.shape)


def timed(fn, reps: int = 50) -> float:
    """Median milliseconds of `fn` over `reps` runs (CUDA events), after warm-up."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


class PixelLinear(nn.Module):
    """A 1×1 conv as a Linear over the pixels of a channels-last tensor, with a dense or 2:4 sparse weight."""

    def __init__(self, conv: nn.Conv2d, sparse: bool):
        super().__init__()
        w = two_four(conv.weight.detach()[:, :, 0, 0])
        self.weight = torch.sparse.to_sparse_semi_structured(w) if sparse else w
        self.stride = conv.stride

    def forward(self, x):
        if self.stride != (1, 1):
            x = x[:, :, ::self.stride[0], ::self.stride[1]]
        B, C, H, W = x.shape
        y = F.linear(x.permute(0, 2, 3, 1).reshape(-1, C), self.weight)
        return y.view(B, H, W, -1).permute(0, 3, 1, 2)


def swap_convs(model: nn.Module, sparse: bool) -> int:
    n = 0
    for name, m in list(model.named_modules()):
        for cname, c in list(m.named_children()):
            if isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1) and c.groups == 1 and c.in_channels % 64 == 0:
                setattr(m, cname, PixelLinear(c, sparse))
                n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--json", default="experiments/gpu/semi_structured.json")
    p.add_argument("--backend", choices=["default", "cutlass"], default="default",
                   help="PyTorch's default 2:4 backend (cuSPARSELt where built in) or CUTLASS")
    args = p.parse_args()
    if args.backend == "cutlass":
        torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = True
    import torchvision

    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "dtype": "float16",
           "backend": args.backend,
           "batch": args.batch, "layers": [], "end_to_end": {}}
    # ResNet-50's 1×1 conv shapes (in, out, spatial side at 224 px) and the fc
    shapes = [(64, 256, 56), (256, 64, 56), (128, 512, 28), (512, 128, 28), (256, 1024, 14), (1024, 256, 14),
              (512, 2048, 7), (2048, 512, 7), (2048, 1000, 1)]
    for cin, cout, side in shapes:
        tokens = args.batch * side * side
        x = torch.randn(tokens, cin, device=dev, dtype=torch.half)
        w = two_four(torch.randn(cout, cin, device=dev, dtype=torch.half))
        row = {"in": cin, "out": cout, "tokens": tokens}
        try:
            ws = torch.sparse.to_sparse_semi_structured(w)
            torch.testing.assert_close(F.linear(x, ws), F.linear(x, w), rtol=1e-2, atol=1e-1)
            row["dense_ms"], row["sparse_ms"] = timed(lambda: F.linear(x, w)), timed(lambda: F.linear(x, ws))
            row["speedup"] = row["dense_ms"] / row["sparse_ms"]
            # the sparse operand first (W·Xᵀ, no transposed activation): the kernels' own orientation
            xt = x.t().contiguous()
            row["dense_first_ms"] = timed(lambda: torch.mm(w, xt))
            row["sparse_first_ms"] = timed(lambda: torch.mm(ws, xt))
        except Exception as e:  # a shape or a build without the sparse kernels: say so
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        out["layers"].append(row)
        print(row, flush=True)
    x = torch.randn(args.batch, 3, 224, 224, device=dev, dtype=torch.half)
    for label in ("conv", "dense_linear", "sparse_linear"):
        torch.manual_seed(0)
        model = torchvision.models.resnet50().to(dev).half().eval()
        swapped = swap_convs(model, sparse=label == "sparse_linear") if label != "conv" else 0
        with torch.no_grad():
            try:
                ms = timed(lambda: model(x), reps=20)
                out["end_to_end"][label] = {"ms": ms, "images_per_s": args.batch / ms * 1e3, "swapped": swapped}
            except Exception as e:
                out["end_to_end"][label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        print(label, out["end_to_end"][label], flush=True)
    out["date"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
