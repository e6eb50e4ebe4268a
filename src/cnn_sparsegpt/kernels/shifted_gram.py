"""The Hessian of a stride-1 convolution without im2col: its tap blocks are shifted channel correlations.

For a k_h×k_w conv with stride 1, the im2col column of tap t = (a, b) at output position (i, j) is X_pad[:, i+a, j+b].
The block of Σ y_col x_colᵀ for taps t = (a, b) and t' = (a', b') is therefore
    Σ_{u ∈ [a, a+H_out), v ∈ [b, b+W_out)}  Y_pad[:, u, v] X_pad[:, u+δr, v+δc]ᵀ,      δ = (a'−a, b'−b),
a correlation at offset δ over a window that depends on t only at its borders. Each distinct δ (13 for a symmetric
3×3 Hessian instead of 45 tap-pair blocks, 25 for a cross product) is one GEMM over the whole input laid out
channel-first with k−1 zero columns appended per row and k−1 zero rows per image: a shift by δ is then a shift of
the flattened index (s = δr·W_q + δc, W_q = W + k_w − 1), no copy, and real pixels never pair across rows or images
(they meet the appended zeros, which also stand for the padding: only pairs of real pixels add anything). Each
block then takes off the rows and columns outside its window (at most k−1 of each, and none that are all padding:
for a padded 3×3 conv the centre tap needs no correction, the others one row or column). Equal to the im2col
product up to float rounding (tests); the input is copied once instead of k_h·k_w times.
"""
from __future__ import annotations

import torch


def _layout(x: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (C, B, H + k_h − 1, W + k_w − 1): channel-first, k−1 zero rows and columns appended. They
    are the padding too: in the flattened index the zeros after one row (image) are the ones before the next."""
    kh, kw = kernel
    B, C, H, W = x.shape
    z = x.new_zeros(C, B, H + kh - 1, W + kw - 1)
    z[:, :, :H, :W] = x.transpose(0, 1)  # one copy (pad, then transpose, took two: ~1.7x the time)
    return z


def conv_gram(x: torch.Tensor, kernel: tuple[int, int], padding: tuple[int, int], y: torch.Tensor | None = None,
              out: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """Σ over images and output positions of y_col x_colᵀ (y = x when None: the symmetric X Xᵀ) for a stride-1,
    dilation-1, zero-padded conv, rows and columns in the solver's (k_h, k_w, in) order: (k_h·k_w·C, k_h·k_w·C)
    float32, the same matrix as unfold(y) @ unfold(x)ᵀ. With `out`: written there (beta 0) or added to it (beta 1)."""
    (kh, kw), (ph, pw) = kernel, padding
    B, C, H, W = x.shape
    Wq = W + kw - 1
    Ho, Wo = H + 2 * ph - kh + 1, W + 2 * pw - kw + 1
    zx = _layout(x.float(), kernel)
    zy = zx if y is None else _layout(y.float(), kernel)
    fx, fy = zx.view(C, -1), zy.view(C, -1)
    N = fx.shape[1]
    memo: dict[tuple, torch.Tensor] = {}

    def strip(r0, r1, c0, c1, dr, dc):  # Σ over images, u in [r0, r1), v in [c0, c1) of y[u, v] x[u+δr, v+δc]ᵀ
        key = (r0, r1, c0, c1, dr, dc)  # (padded coordinates, all real pixels: stored at (u − p_h, v − p_w))
        if key not in memo:
            ya = zy[:, :, r0 - ph:r1 - ph, c0 - pw:c1 - pw].reshape(C, -1)
            xa = zx[:, :, r0 + dr - ph:r1 + dr - ph, c0 + dc - pw:c1 + dc - pw].reshape(C, -1)
            memo[key] = ya @ xa.t()
        return memo[key]

    taps = kh * kw
    if out is None:
        out, beta = torch.empty(taps * C, taps * C, device=x.device), 0.0
    full: dict[tuple[int, int], torch.Tensor] = {}
    for t in range(taps):
        a, b = divmod(t, kw)
        for t2 in range(t if y is None else 0, taps):
            dr, dc = divmod(t2, kw)[0] - a, divmod(t2, kw)[1] - b
            if (dr, dc) not in full:  # the whole correlation at offset δ: one GEMM on shifted views
                s = dr * Wq + dc
                full[dr, dc] = fy[:, max(0, -s):N - max(0, s)] @ fx[:, max(0, s):N - max(0, -s)].t()
            block = full[dr, dc].clone()
            # where both y[u, v] and x[u+δr, v+δc] are real (not padding): rows [rlo, rhi), columns [clo, chi)
            rlo, rhi = max(ph, ph - dr), min(ph + H, ph + H - dr)
            clo, chi = max(pw, pw - dc), min(pw + W, pw + W - dc)
            if rlo >= rhi or clo >= chi:
                continue
            for r0, r1 in ((rlo, min(rhi, a)), (max(rlo, a + Ho), rhi)):  # rows outside the window, every column
                if r0 < r1:
                    block -= strip(r0, r1, clo, chi, dr, dc)
            i0, i1 = max(rlo, a), min(rhi, a + Ho)  # columns outside the window, rows inside it
            for c0, c1 in ((clo, min(chi, b)), (max(clo, b + Wo), chi)):
                if c0 < c1 and i0 < i1:
                    block -= strip(i0, i1, c0, c1, dr, dc)
            if y is None and t2 == t:  # exactly symmetric, as accumulate_xxt_ makes it (a GEMM's XXᵀ need not be)
                block = block.triu() + block.triu(1).t()
            targets = [(out[t * C:(t + 1) * C, t2 * C:(t2 + 1) * C], block)]
            if y is None and t2 != t:
                targets.append((out[t2 * C:(t2 + 1) * C, t * C:(t + 1) * C], block.t()))
            for where, value in targets:
                where.copy_(value) if beta == 0 else where.add_(value)
    return out


def offsets(kernel: tuple[int, int], symmetric: bool = True) -> int:
    """Distinct shifts δ the product needs: 13 for a symmetric 3×3 Hessian, 25 for a cross product."""
    kh, kw = kernel
    return kw + (kh - 1) * (2 * kw - 1) if symmetric else (2 * kh - 1) * (2 * kw - 1)


def flops(kernel: tuple[int, int], padding: tuple[int, int], size: tuple[int, int], channels: int = 1,
          images: int = 1) -> tuple[int, int]:
    """Flops of XXᵀ for a stride-1 conv's input (images, channels, *size): (shifted, im2col). Shifted: one full
    C×C GEMM per offset over the input laid out with k−1 zeros appended per row and image (border corrections left
    out); im2col: the symmetric product, half of (k²C)² multiply-adds per output position (its k² copies of the
    input left out)."""
    (kh, kw), (ph, pw), (H, W) = kernel, padding, size
    shifted = offsets(kernel) * 2 * (H + kh - 1) * (W + kw - 1)
    im2col = (kh * kw) ** 2 * (H + 2 * ph - kh + 1) * (W + 2 * pw - kw + 1)
    return shifted * channels ** 2 * images, im2col * channels ** 2 * images


def cheaper(kernel: tuple[int, int], padding: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether the shifted product of XXᵀ takes clearly fewer flops than im2col's (which also copies the input k²
    times first). Measured on this project's 2-core CPU (ResNet-18's 3×3 convs, 64–512 channels at 32²–4², flop
    ratios 0.36, 0.41, 0.50, 0.72): 2.8×, 2.7×, 2.4× faster at 32², 16², 8², as fast at 4², where the border
    corrections are a quarter of each window; 0.6 keeps the margin."""
    if kernel[0] * kernel[1] == 1:  # a 1×1 conv's columns are its input: nothing to save
        return False
    shifted, im2col = flops(kernel, padding, size)
    return shifted <= 0.6 * im2col
