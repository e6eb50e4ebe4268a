"""The Hessian of a convolution without im2col: its tap blocks are shifted channel correlations.

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

A strided conv's taps read the input's phases (rows r, r + s, …), each shifted: its blocks are correlations between
two phases at an offset, by the same two ways (see conv_gram).
"""
from __future__ import annotations

import functools

import torch


def _layout(x: torch.Tensor, span: tuple[int, int], size: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (C, B, H' + s_h − 1, W' + s_w − 1), (H', W') = size (default (H, W), larger for a phase
    smaller than the largest): channel-first, zeros after the pixels, s − 1 of them at least (s: the span of the taps'
    shifts, the kernel for stride 1). They are the padding too: in the flattened index the zeros after one row (image)
    are the ones before the next."""
    (sh, sw), (B, C, H, W) = span, x.shape
    Hs, Ws = size or (H, W)
    z = x.new_zeros(C, B, Hs + sh - 1, Ws + sw - 1)
    z[:, :, :H, :W] = x.transpose(0, 1)  # one copy (pad, then transpose, took two: ~1.7x the time)
    return z


def _segments(lo: int, hi: int, cuts) -> list[tuple[int, int]]:
    """[lo, hi) split at the cuts inside it."""
    edges = sorted({lo, hi} | {c for c in cuts if lo < c < hi})
    return list(zip(edges[:-1], edges[1:]))


# A strided conv's Hessian goes by its phases (on a CPU) from this many input channels, on phase maps of 16² and
# more (whole-phase GEMMs) or, from twice as many channels, on smaller ones (cells); else by im2col. Measured on this
# project's 2-core CPU, 3×3 stride-2 convs, one layer under the prune's allocator (benchmarks/hessian_paths.py),
# seconds, im2col / whole phases / phase cells: 64 channels at 32² 0.28 / 0.23 / 0.26, at 56² 0.21 / 0.17 / 0.20, at
# 112² 0.42 / 0.32 / 0.49, at 224² 0.40 / 0.30 / 0.65, but at 16² 0.067 / 0.068 / 0.079 and at 8² 0.019 / 0.027 /
# 0.026; 128 at 8² 0.060 / 0.072 / 0.053, at 16² 0.22 / 0.20 / 0.18, at 56² 0.63 / 0.47 / 0.55, at 112² 0.61 / 0.47 /
# 0.64; 256 at 8² 0.21 / 0.24 / 0.15, at 28² 0.54 / 0.46 / 0.41; 512 at 8² 0.74 / 0.86 / 0.56, at 14² 0.55 / 0.57 /
# 0.41. Below 64 channels the phases win on some maps too (16 at 32²: 0.046 / 0.037) but not on others (32 at 16²:
# 0.025 / 0.027 / 0.045); they are left on im2col, which also keeps ResNet-20's Hessians (16–64 channels) as they were.
STRIDED_CHANNELS = 64


def by_cells(kernel: tuple[int, int], size: tuple[int, int], channels: int = 1, cpu: bool = True,
             phases: bool = False) -> bool:
    """Whether the product goes cell by cell (see conv_gram): where the appended zeros make the whole-input GEMMs
    half as large again as the pixels (a 3×3 kernel at 8² and below), or 15% larger with 64 channels or more, whose
    row-by-row cell GEMMs are large enough to run at speed. Measured with 3×3 convs on this project's 2-core CPU
    (one batch, cells against whole-input GEMMs, commit 8567a89): 128 channels at 16² 49 / 69 ms, 256 at 14²
    35 / 46, 64 at 16² 20 / 24, 128 at 24² 59 / 65, 512 at 7² 33 / 58; but 32 channels at 16² 11 / 8, 128 at 28²
    46 / 44, 64 at 32² 77 / 80 (taken whole: within noise). On a GPU (cpu=False) only the first rule: cells launch a
    kernel per row, and that has not been measured there. A strided conv's phases (`phases`, kernel = the taps'
    span there, size = the largest phase's): cells below 16² (see STRIDED_CHANNELS)."""
    (kh, kw), (H, W) = kernel, size
    appended = (H + kh - 1) * (W + kw - 1) / (H * W)
    if phases:
        return appended > 1.14  # 14² phases of a 3×3 stride-2 conv: 1.148, 16²: 1.129
    return appended > 1.5 or (cpu and appended > 1.15 and channels >= 64)


def takes_cells(kernel: tuple[int, int], padding: tuple[int, int], size: tuple[int, int],
                stride: tuple[int, int] = (1, 1), channels: int = 1, cpu: bool = True) -> bool:
    """Whether conv_gram sums this conv's products by cells (else whole-input or whole-phase GEMMs): `by_cells`
    on the taps' span and the largest phase (stride 1: the kernel and the input)."""
    stride = tuple(stride)
    taps = _tap_planes(kernel, padding, stride)
    return by_cells(_span(taps), _phase_size(size, stride), channels, cpu, phases=stride != (1, 1))


def conv_gram(x: torch.Tensor, kernel: tuple[int, int], padding: tuple[int, int], y: torch.Tensor | None = None,
              out: torch.Tensor | None = None, beta: float = 0.0, mirror: bool = True,
              stride: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """Σ over images and output positions of y_col x_colᵀ (y = x when None: the symmetric X Xᵀ) for a dilation-1,
    zero-padded conv, rows and columns in the solver's (k_h, k_w, in) order: (k_h·k_w·C, k_h·k_w·C) float32, the same
    matrix as unfold(y) @ unfold(x)ᵀ. With `out`: written there (beta 0) or added to it (beta 1). mirror=False (XXᵀ
    only): the tap blocks below the diagonal are left unwritten and the diagonal ones as summed, for sums whose upper
    blocks alone are read (linalg.add_upper_, then mirror_upper_ once).

    Each block is the correlation at its offset over its tap's window: on large maps the whole-input GEMM at that
    offset less the strips outside the window; on small ones (`by_cells`) the sum of the cells, cut at every tap's
    window edges, that make up the window, each cell's GEMM shared by all blocks at that offset: only real pixel
    pairs are multiplied. Cells read the input laid out (C, H, W, images), where each row of a cell is one
    contiguous run of columns: their GEMMs read views, row by row, and nothing is copied per cell. A strided conv
    goes by the input's phases (polyphase: tap a of output row i reads input row s·i + a − p, row i + ⌊(a − p)/s⌋ of
    phase (a − p) mod s), so its blocks too are correlations at offsets, between phases: 34 distinct products of C×C
    instead of 45 tap-pair blocks for a 3×3 conv of stride 2, and no k² copies of the input; both ways as above, the
    whole-input one with every phase on the largest phase's grid."""
    stride = tuple(stride)
    B, C, H, W = x.shape
    Ho, Wo = output_size((H, W), kernel, padding, stride)
    taps = _tap_planes(kernel, padding, stride)
    planes = sorted({plane for plane, _, _ in taps})
    span, size = _span(taps), _phase_size((H, W), stride)  # (stride 1: the kernel and the input's size)
    cells = takes_cells(kernel, padding, (H, W), stride, C, x.device.type == "cpu")

    def phases(z, layout):  # each phase the taps read (stride 1: the input itself), laid out
        return {pl: layout(z[:, :, pl[0]::stride[0], pl[1]::stride[1]].float()) for pl in planes}
    if cells:  # (C, H', W', images)
        zx = phases(x, _pixels_last)
        zy = zx if y is None else phases(y, _pixels_last)
    else:  # (C, images, H' + s − 1, W' + s − 1), every phase on the largest one's grid, flattened for shifts
        lx = phases(x, lambda z: _layout(z, span, size))
        ly = lx if y is None else phases(y, lambda z: _layout(z, span, size))
        fx, fy = ({pl: z.view(C, -1) for pl, z in zs.items()} for zs in (lx, ly))
        N, Wq = fx[planes[0]].shape[1], size[1] + span[1] - 1
    memo: dict[tuple, torch.Tensor] = {}

    def piece(py, px, r0, r1, c0, c1, dr, dc):  # Σ over images, u in [r0, r1), v in [c0, c1) of y[u, v] x[u+δr, v+δc]ᵀ
        key = (r0, r1, c0, c1)
        if key not in memo:
            if cells:  # one GEMM per row on views, or one for whole rows (contiguous across rows too)
                wy, wx = zy[py].shape[2], zx[px].shape[2]
                whole = c0 == 0 and c1 == wy == wx and dc == 0
                spans = [(r0, r1)] if whole else [(r, r + 1) for r in range(r0, r1)]
                prod = None
                for a, b in spans:
                    ya = zy[py][:, a:b, c0:c1].reshape(C, -1)
                    xa = zx[px][:, a + dr:b + dr, c0 + dc:c1 + dc].reshape(C, -1)
                    prod = ya @ xa.t() if prod is None else prod.addmm_(ya, xa.t())
                memo[key] = prod
            else:
                ya = ly[py][:, :, r0:r1, c0:c1].reshape(C, -1)
                xa = lx[px][:, :, r0 + dr:r1 + dr, c0 + dc:c1 + dc].reshape(C, -1)
                memo[key] = ya @ xa.t()
        return memo[key]

    def full(py, px, dr, dc):  # the whole correlation at offset δ: one GEMM on shifted views of the flattened layouts
        s = dr * Wq + dc
        return fy[py][:, max(0, -s):N - max(0, s)] @ fx[px][:, max(0, s):N - max(0, -s)].t()

    if out is None:
        out, beta = torch.empty(len(taps) * C, len(taps) * C, device=x.device), 0.0
    symmetric = y is None
    row_cuts, col_cuts = _cuts(taps, (Ho, Wo))
    previous = None
    # blocks taken product by product (phases and offset), so that the memo holds one product's cells at a time (at
    # 4² and 512 channels, all offsets' cells would be 117 MB)
    for (py, px, dr, dc), t, t2, (rlo, rhi, clo, chi), (i0, i1, j0, j1) in _blocks(taps, (H, W), (Ho, Wo), stride,
                                                                                   symmetric):
        if (py, px, dr, dc) != previous:
            memo.clear()
            previous = (py, px, dr, dc)
        if i0 >= i1 or j0 >= j1:
            terms = []
        elif cells:
            terms = [(1, piece(py, px, r0, r1, c0, c1, dr, dc)) for r0, r1 in _segments(i0, i1, row_cuts)
                     for c0, c1 in _segments(j0, j1, col_cuts)]
        else:
            if "full" not in memo:
                memo["full"] = full(py, px, dr, dc)
            terms = [(1, memo["full"])]
            terms += [(-1, piece(py, px, r0, r1, clo, chi, dr, dc)) for r0, r1 in ((rlo, i0), (i1, rhi)) if r0 < r1]
            terms += [(-1, piece(py, px, i0, i1, c0, c1, dr, dc)) for c0, c1 in ((clo, j0), (j1, chi)) if c0 < c1]
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


def output_size(size, kernel, padding, stride) -> tuple[int, int]:
    """A zero-padded, dilation-1 conv's output map for an input map of `size`."""
    return tuple((n + 2 * p - k) // s + 1 for n, k, p, s in zip(size, kernel, padding, stride))


def _span(taps) -> tuple[int, int]:
    """How far the taps' shifts within a phase reach, rows and columns (stride 1: the kernel's size)."""
    return (max(q for _, q, _ in taps) - min(q for _, q, _ in taps) + 1,
            max(q for _, _, q in taps) - min(q for _, _, q in taps) + 1)


def _phase_size(size, stride) -> tuple[int, int]:
    """The largest phase's size (stride 1: the input's)."""
    return tuple(-(-n // s) for n, s in zip(size, stride))


def _tap_planes(kernel, padding, stride) -> list[tuple[tuple[int, int], int, int]]:
    """For each tap t = (a, b), in the solver's order: the input phase it reads and its shift there, ((r_a, r_b), q_a,
    q_b). Tap a of output row i reads input row s·i + a − p = s·(i + q_a) + r_a (stride 1: one phase, q_a = a − p)."""
    (kh, kw), (ph, pw), (sh, sw) = kernel, padding, stride
    rows, cols = [divmod(a - ph, sh) for a in range(kh)], [divmod(b - pw, sw) for b in range(kw)]
    return [((ra, rb), qa, qb) for qa, ra in rows for qb, rb in cols]


def _cuts(taps, out_size) -> tuple[list[int], list[int]]:
    """Every tap's window edges (in its phase's coordinates), where cells are cut."""
    (Ho, Wo) = out_size
    return [qa + e for _, qa, _ in taps for e in (0, Ho)], [qb + e for _, _, qb in taps for e in (0, Wo)]


def _blocks(taps, size, out_size, stride, symmetric: bool):
    """Every block (t, t2) of the product (t ≤ t2 when symmetric), grouped by the product it reads, (phase of y,
    phase of x, δr, δc): yields that key, t, t2, where both y[u, v] and x[u+δr, v+δc] are real pixels (rows [rlo,
    rhi), columns [clo, chi)) and, of those, tap t's window (rows [i0, i1), columns [j0, j1)), in y's phase."""
    (H, W), (Ho, Wo), (sh, sw) = size, out_size, stride
    n = len(taps)
    keyed = []
    for t in range(n):
        for t2 in range(t if symmetric else 0, n):
            (py, qa, qb), (px, qa2, qb2) = taps[t], taps[t2]
            keyed.append(((py, px, qa2 - qa, qb2 - qb), t, t2))
    keyed.sort()
    for (py, px, dr, dc), t, t2 in keyed:
        hy, wy = len(range(py[0], H, sh)), len(range(py[1], W, sw))  # the phases' sizes
        hx, wx = len(range(px[0], H, sh)), len(range(px[1], W, sw))
        _, qa, qb = taps[t]
        rlo, rhi = max(0, -dr), min(hy, hx - dr)
        clo, chi = max(0, -dc), min(wy, wx - dc)
        window = max(rlo, qa), min(rhi, qa + Ho), max(clo, qb), min(chi, qb + Wo)
        yield (py, px, dr, dc), t, t2, (rlo, rhi, clo, chi), window


def offsets(kernel: tuple[int, int], symmetric: bool = True, padding: tuple[int, int] = (0, 0),
            stride: tuple[int, int] = (1, 1)) -> int:
    """Distinct products of C×C the product needs: 13 for a symmetric 3×3 Hessian, 25 for a cross product, 34 for a
    symmetric 3×3 of stride 2 (by phase pair and offset)."""
    taps = _tap_planes(kernel, padding, stride)
    n = len(taps)
    return len({(taps[t][0], taps[t2][0], taps[t2][1] - taps[t][1], taps[t2][2] - taps[t][2])
                for t in range(n) for t2 in range(t if symmetric else 0, n)})


@functools.lru_cache(maxsize=256)
def _cell_pixels(kernel, padding, stride, size) -> int:
    """Pixel pairs the cells of a symmetric product multiply (each distinct cell once per product)."""
    taps = _tap_planes(kernel, padding, stride)
    out_size = output_size(size, kernel, padding, stride)
    row_cuts, col_cuts = _cuts(taps, out_size)
    seen = set()
    for key, _, _, _, (i0, i1, j0, j1) in _blocks(taps, size, out_size, stride, True):
        if i0 < i1 and j0 < j1:
            seen |= {(key, r, c) for r in _segments(i0, i1, row_cuts) for c in _segments(j0, j1, col_cuts)}
    return sum((r1 - r0) * (c1 - c0) for _, (r0, r1), (c0, c1) in seen)


def flops(kernel: tuple[int, int], padding: tuple[int, int], size: tuple[int, int], channels: int = 1,
          images: int = 1, stride: tuple[int, int] = (1, 1), cpu: bool = True) -> tuple[int, int]:
    """Flops of XXᵀ for a conv's input (images, channels, *size): (shifted, im2col). Shifted: one C×C GEMM per offset
    over the input (a strided conv's phases) laid out with zeros appended per row and image (border corrections left
    out), or by cells over the real pixel pairs of each product (takes_cells); im2col: the symmetric product, half of
    (k²C)² multiply-adds per output position (its k² copies of the input left out)."""
    (kh, kw), stride = kernel, tuple(stride)
    taps = _tap_planes(kernel, padding, stride)
    (sh, sw), (H, W) = _span(taps), _phase_size(size, stride)
    if takes_cells(kernel, padding, size, stride, channels, cpu):
        shifted = 2 * _cell_pixels(tuple(kernel), tuple(padding), stride, tuple(size))
    else:
        shifted = offsets(kernel, padding=padding, stride=stride) * 2 * (H + sh - 1) * (W + sw - 1)
    Ho, Wo = output_size(size, kernel, padding, stride)
    im2col = (kh * kw) ** 2 * Ho * Wo
    return shifted * channels ** 2 * images, im2col * channels ** 2 * images


def cheaper(kernel: tuple[int, int], padding: tuple[int, int], size: tuple[int, int],
            stride: tuple[int, int] = (1, 1), channels: int = 1, cpu: bool = True) -> bool:
    """Whether the shifted product of XXᵀ takes clearly fewer flops than im2col's (which also copies the input k²
    times first). Measured on this project's 2-core CPU (ResNet-18's 3×3 convs, 64–512 channels at 32²–4², flop
    ratios 0.36, 0.41, 0.26 and 0.16, the last two by cells): 2.9×, 2.6×, 2.0× and 1.6× faster (benchmarks/
    hessian_rate.py, commit 200b08c); 0.6 keeps a margin (an unpadded 3×3 conv on a 3×3 map: 1.1, im2col). A strided
    conv: by its phases where STRIDED_CHANNELS says, and at most im2col's flops (a 2×2 conv of stride 2 is not: its
    phases share nothing); on a CPU only (on a GPU, im2col's one large GEMM against the phases' many small ones has
    not been measured)."""
    if kernel[0] * kernel[1] == 1:  # a 1×1 conv's columns are its input: nothing to save
        return False
    strided = tuple(stride) != (1, 1)
    if strided:
        small = takes_cells(kernel, padding, size, stride, channels, cpu)  # small phase maps
        if not cpu or channels < STRIDED_CHANNELS or (small and channels < 2 * STRIDED_CHANNELS):
            return False
    shifted, im2col = flops(kernel, padding, size, channels, stride=stride, cpu=cpu)
    return shifted <= (1.0 if strided else 0.6) * im2col
