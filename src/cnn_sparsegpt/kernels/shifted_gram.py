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


def _segments(lo: int, hi: int, cuts) -> list[tuple[int, int]]:
    """[lo, hi) split at the cuts inside it."""
    edges = sorted({lo, hi} | {c for c in cuts if lo < c < hi})
    return list(zip(edges[:-1], edges[1:]))


def by_cells(kernel: tuple[int, int], size: tuple[int, int], channels: int = 1) -> bool:
    """Whether the product goes cell by cell (see conv_gram): where the appended zeros make the whole-input GEMMs
    half as large again as the pixels (a 3×3 kernel at 8² and below), or 15% larger with 64 channels or more, whose
    row-by-row cell GEMMs are large enough to run at speed. Measured with 3×3 convs on this project's 2-core CPU
    (one batch, cells against whole-input GEMMs, commit after 2351a08): 128 channels at 16² 49 / 69 ms, 256 at 14²
    35 / 46, 64 at 16² 20 / 24, 128 at 24² 59 / 65, 512 at 7² 33 / 58; but 32 channels at 16² 11 / 8, 128 at 28²
    46 / 44, 64 at 32² 77 / 80 (taken whole: within noise)."""
    (kh, kw), (H, W) = kernel, size
    appended = (H + kh - 1) * (W + kw - 1) / (H * W)
    return appended > 1.5 or (appended > 1.15 and channels >= 64)


def conv_gram(x: torch.Tensor, kernel: tuple[int, int], padding: tuple[int, int], y: torch.Tensor | None = None,
              out: torch.Tensor | None = None, beta: float = 0.0, mirror: bool = True) -> torch.Tensor:
    """Σ over images and output positions of y_col x_colᵀ (y = x when None: the symmetric X Xᵀ) for a stride-1,
    dilation-1, zero-padded conv, rows and columns in the solver's (k_h, k_w, in) order: (k_h·k_w·C, k_h·k_w·C)
    float32, the same matrix as unfold(y) @ unfold(x)ᵀ. With `out`: written there (beta 0) or added to it (beta 1).
    mirror=False (XXᵀ only): the tap blocks below the diagonal are left unwritten and the diagonal ones as summed,
    for sums whose upper blocks alone are read (linalg.add_upper_, then mirror_upper_ once).

    Each block is the correlation at its offset over its tap's window: on large maps the whole-input GEMM at that
    offset less the strips outside the window; on small ones (`by_cells`) the sum of the cells, cut at every tap's
    window edges, that make up the window, each cell's GEMM shared by all blocks at that offset: only real pixel
    pairs are multiplied. Cells read the input laid out (C, H, W, images), where each row of a cell is one
    contiguous run of columns: their GEMMs read views, row by row, and nothing is copied per cell."""
    (kh, kw), (ph, pw) = kernel, padding
    B, C, H, W = x.shape
    Wq = W + kw - 1
    Ho, Wo = H + 2 * ph - kh + 1, W + 2 * pw - kw + 1
    cells = by_cells(kernel, (H, W), C)
    layout = _pixels_last if cells else lambda z: _layout(z, kernel)
    zx = layout(x.float())  # real pixel (u, v) at [:, u, v] (cells) or [:, :, u, v]
    zy = zx if y is None else layout(y.float())
    fx, fy = zx.view(C, -1), zy.view(C, -1)
    N = fx.shape[1]
    memo: dict[tuple, torch.Tensor] = {}

    def piece(r0, r1, c0, c1, dr, dc):  # Σ over images, u in [r0, r1), v in [c0, c1) of y[u, v] x[u+δr, v+δc]ᵀ
        key = (r0, r1, c0, c1, dr, dc)
        if key not in memo:
            if cells:  # one GEMM per row on views, or one for whole rows (contiguous across rows too)
                spans = [(r0, r1)] if c0 == 0 and c1 == W and dc == 0 else [(r, r + 1) for r in range(r0, r1)]
                prod = None
                for a, b in spans:
                    ya = zy[:, a:b, c0:c1].reshape(C, -1)
                    xa = zx[:, a + dr:b + dr, c0 + dc:c1 + dc].reshape(C, -1)
                    prod = ya @ xa.t() if prod is None else prod.addmm_(ya, xa.t())
                memo[key] = prod
            else:
                ya = zy[:, :, r0:r1, c0:c1].reshape(C, -1)
                xa = zx[:, :, r0 + dr:r1 + dr, c0 + dc:c1 + dc].reshape(C, -1)
                memo[key] = ya @ xa.t()
        return memo[key]

    def full(dr, dc):  # the whole correlation at offset δ: one GEMM on shifted views of the flattened layout
        s = dr * Wq + dc
        return fy[:, max(0, -s):N - max(0, s)] @ fx[:, max(0, s):N - max(0, -s)].t()

    row_cuts = [a - ph + e for a in range(kh) for e in (0, Ho)]  # every tap's window edges
    col_cuts = [b - pw + e for b in range(kw) for e in (0, Wo)]
    taps = kh * kw
    if out is None:
        out, beta = torch.empty(taps * C, taps * C, device=x.device), 0.0
    symmetric = y is None
    # blocks taken offset by offset, so that the memo of products holds one offset's at a time (at 4² and 512
    # channels, all offsets' cells would be 117 MB)
    pairs = _tap_pairs(kernel, symmetric=symmetric)
    for k, (dr, dc, t, t2) in enumerate(pairs):
        if k and pairs[k - 1][:2] != (dr, dc):
            memo.clear()
        a, b = divmod(t, kw)
        # where both y[u, v] and x[u+δr, v+δc] are real (not padding): rows [rlo, rhi), columns [clo, chi);
        # of those, the tap's window: rows [i0, i1), columns [j0, j1)
        rlo, rhi = max(0, -dr), min(H, H - dr)
        clo, chi = max(0, -dc), min(W, W - dc)
        i0, i1 = max(rlo, a - ph), min(rhi, a - ph + Ho)
        j0, j1 = max(clo, b - pw), min(chi, b - pw + Wo)
        if i0 >= i1 or j0 >= j1:
            terms = []
        elif cells:
            terms = [(1, piece(r0, r1, c0, c1, dr, dc)) for r0, r1 in _segments(i0, i1, row_cuts)
                     for c0, c1 in _segments(j0, j1, col_cuts)]
        else:
            if "full" not in memo:
                memo["full"] = full(dr, dc)
            terms = [(1, memo["full"])]
            terms += [(-1, piece(r0, r1, clo, chi, dr, dc)) for r0, r1 in ((rlo, i0), (i1, rhi)) if r0 < r1]
            terms += [(-1, piece(i0, i1, c0, c1, dr, dc)) for c0, c1 in ((clo, j0), (j1, chi)) if c0 < c1]
        block = out[t * C:(t + 1) * C, t2 * C:(t2 + 1) * C]  # summed in place: no C×C temporaries
        if beta == 0 and terms:  # (a first term is always one to add)
            block.copy_(terms.pop(0)[1])
        elif beta == 0:
            block.zero_()
        for sign, term in terms:
            block.add_(term, alpha=sign)
        if symmetric and mirror:
            if t2 == t:  # exactly symmetric, as accumulate_xxt_ makes it (a GEMM's XXᵀ need not be)
                block.copy_(block.triu() + block.triu(1).t())
            else:
                out[t2 * C:(t2 + 1) * C, t * C:(t + 1) * C].copy_(block.t())
    return out


def _pixels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (C, H, W, B): the cells' layout, one copy."""
    return x.permute(1, 2, 3, 0).contiguous()


def _tap_pairs(kernel: tuple[int, int], symmetric: bool = True) -> list[tuple[int, int, int, int]]:
    """(δr, δc, t, t2) for every block of the product (t ≤ t2 when symmetric), sorted by offset."""
    kh, kw = kernel
    taps = kh * kw
    return sorted((divmod(t2, kw)[0] - divmod(t, kw)[0], divmod(t2, kw)[1] - divmod(t, kw)[1], t, t2)
                  for t in range(taps) for t2 in range(t if symmetric else 0, taps))


def _deltas(kernel: tuple[int, int], symmetric: bool = True) -> set[tuple[int, int]]:
    return {pair[:2] for pair in _tap_pairs(kernel, symmetric)}


def offsets(kernel: tuple[int, int], symmetric: bool = True) -> int:
    """Distinct shifts δ the product needs: 13 for a symmetric 3×3 Hessian, 25 for a cross product."""
    return len(_deltas(kernel, symmetric))


def flops(kernel: tuple[int, int], padding: tuple[int, int], size: tuple[int, int], channels: int = 1,
          images: int = 1) -> tuple[int, int]:
    """Flops of XXᵀ for a stride-1 conv's input (images, channels, *size): (shifted, im2col). Shifted: one C×C GEMM
    per offset over the input laid out with k−1 zeros appended per row and image (border corrections left out), or
    by cells over the real pixel pairs at each offset; im2col: the symmetric product, half of (k²C)² multiply-adds
    per output position (its k² copies of the input left out)."""
    (kh, kw), (ph, pw), (H, W) = kernel, padding, size
    if by_cells(kernel, size, channels):
        shifted = 2 * sum(max(0, H - abs(dr)) * max(0, W - abs(dc)) for dr, dc in _deltas(kernel))
    else:
        shifted = offsets(kernel) * 2 * (H + kh - 1) * (W + kw - 1)
    im2col = (kh * kw) ** 2 * (H + 2 * ph - kh + 1) * (W + 2 * pw - kw + 1)
    return shifted * channels ** 2 * images, im2col * channels ** 2 * images


def cheaper(kernel: tuple[int, int], padding: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether the shifted product of XXᵀ takes clearly fewer flops than im2col's (which also copies the input k²
    times first). Measured on this project's 2-core CPU (ResNet-18's 3×3 convs, 64–512 channels at 32²–4², flop
    ratios 0.36, 0.41, 0.26 and 0.16, the last two by cells): 2.9×, 2.6×, 2.0× and 1.6× faster (benchmarks/
    hessian_rate.py, commit 200b08c); 0.6 keeps a margin (an unpadded 3×3 conv on a 3×3 map: 1.1, im2col)."""
    if kernel[0] * kernel[1] == 1:  # a 1×1 conv's columns are its input: nothing to save
        return False
    shifted, im2col = flops(kernel, padding, size)
    return shifted <= 0.6 * im2col
