"""SparseGPT's column loop over one block as ONE Triton kernel (issue 22, item 4: the GPU prune is bound by
launching the loop's ~3 small kernels per column, not by their work).

The rows of a block are independent: each program holds a tile of ROWS rows × the block's columns in registers
and runs the whole loop on it. Per column i (as `solver._solve_block`, same arithmetic):
    err = w_i · mask_i / [H⁻¹]ᵢᵢ           (0 where the weight is kept)
    W[:, i:] −= err ⊗ H⁻¹[i, i:]            (the OBS update of the block's later columns)
N:M: at each group's first column the group's m − n smallest w²/[H⁻¹]ᵢᵢ² of every row are pruned, from the
weights as the loop has left them (ties go to the lower column). Unstructured: the block's mask is given.
A register tile cannot be indexed by a runtime column, so a column is read out by a masked sum over the tile
(O(rows·columns) per column, the same order as its rank-1 update).

Triton is imported on first use (the CPU path never needs it). With TRITON_INTERPRET=1 set before that first
use, the kernel runs on CPU tensors in Triton's interpreter: that is how the tests check it without a GPU.
"""
from __future__ import annotations

import functools
import os

import torch

from .masks import Pattern

ROWS = 16  # rows per program: a 16 × 128 float32 tile is 16 registers a thread in 4 warps
NUM_WARPS = 4  # Triton's default; ROWS and NUM_WARPS are swept by benchmarks/column_loop_speed.py on a GPU


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def column_loop(W_ptr, E_ptr, M_ptr, H_ptr, rows, B, n_groups,
                    ROWS: tl.constexpr, BC: tl.constexpr, N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
                    NM: tl.constexpr):
        g = tl.program_id(0)
        r = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BC)
        live_r, live_c = r < rows, c < B
        tile = (g * rows + r[:, None]) * B + c[None, :]  # W, Err and mask are (G, rows, B)
        both = live_r[:, None] & live_c[None, :]
        W = tl.load(W_ptr + tile, mask=both, other=0.0)
        Hb = H_ptr + g * B * B  # H⁻¹'s diagonal block (G, B, B)
        j = tl.arange(0, MP)
        for gi in range(0, n_groups):
            base = gi * M
            if NM:  # the group's mask, from the weights as the loop has left them
                Wg = tl.zeros((ROWS, MP), dtype=tl.float32)
                for k in tl.static_range(M):  # the group's columns, one masked sum each (2-D: fewer registers)
                    Wg = tl.where(j[None, :] == k, tl.sum(tl.where(c[None, :] == base + k, W, 0.0), axis=1)[:, None],
                                  Wg)
                d = tl.load(Hb + (base + j) * (B + 1), mask=j < M, other=1.0)
                # padding columns score beyond any real weight: never among the pruned
                S = tl.where((j < M)[None, :], Wg * Wg / (d * d)[None, :], 3.0e38)
                lower = (S[:, None, :] < S[:, :, None]) | ((S[:, None, :] == S[:, :, None])
                                                           & (j[None, None, :] < j[None, :, None]))
                rank = tl.sum(lower.to(tl.int32), axis=2)  # (ROWS, MP): how many of the group score below
                P = (rank < M - N) & (j < M)[None, :]
                tl.store(M_ptr + (g * rows + r[:, None]) * B + (base + j)[None, :], P.to(tl.int8),
                         mask=live_r[:, None] & (j < M)[None, :])
            for k in tl.static_range(M):
                i = base + k
                col = tl.sum(tl.where(c[None, :] == i, W, 0.0), axis=1)  # (ROWS,)
                if NM:
                    pruned = tl.sum(tl.where(j[None, :] == k, P.to(tl.int32), 0), axis=1) != 0
                else:
                    pruned = tl.load(M_ptr + (g * rows + r) * B + i, mask=live_r, other=0) != 0
                err = tl.where(pruned, col * (1.0 / tl.load(Hb + i * (B + 1))), 0.0)
                tl.store(E_ptr + (g * rows + r) * B + i, err, mask=live_r)
                h = tl.load(Hb + i * B + c, mask=live_c & (c >= i), other=0.0)
                W = W - err[:, None] * h[None, :]
        tl.store(W_ptr + tile, W, mask=both)

    return column_loop


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable(device: torch.device | None = None) -> str | None:
    """Why the fused kernel cannot run here, on `device` where given (None if it can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the triton package is not installed (pip install triton; it runs on CUDA GPUs)"
    if device is not None and device.type != "cuda" and not interpreted():
        return f"it runs on CUDA tensors, not {device.type} ones (use --device cuda or another column loop)"
    return None


def unsupported(W1: torch.Tensor, pattern: Pattern) -> str | None:
    """Why the fused kernel cannot run on weights like W1 with `pattern` (None if it can)."""
    if W1.dtype != torch.float32:
        return f"it runs on float32 weights, got {W1.dtype}"
    if pattern.is_nm and W1.shape[-1] % pattern.m:
        return f"{W1.shape[-1]} columns are not whole groups of {pattern.m}"
    return unavailable(W1.device)


def constants(B: int, pattern: Pattern) -> dict:
    """The kernel's compile-time arguments for a block of B columns: tiles are powers of two (BC ≥ B columns, MP ≥ m
    group members); unstructured masks run as groups of one column."""
    m, n = (pattern.m, pattern.n) if pattern.is_nm else (1, 0)
    return {"ROWS": ROWS, "BC": max(16, 1 << (B - 1).bit_length()), "N": n, "M": m,
            "MP": max(2, 1 << (m - 1).bit_length()), "NM": pattern.is_nm}


def solve_block_fused(W1: torch.Tensor, Err1: torch.Tensor, mask1: torch.Tensor, Hinv1: torch.Tensor,
                      pattern: Pattern) -> None:
    """`solver._solve_block` without a grid, in place on W1, Err1, mask1 (G, rows, B) with H⁻¹'s diagonal block
    Hinv1 (G, B, B): one kernel launch."""
    G, rows, B = W1.shape
    W, E = W1.contiguous(), Err1.contiguous()
    Mk = mask1.to(torch.int8).contiguous()
    H = Hinv1.to(W.dtype).contiguous()
    const = constants(B, pattern)
    _kernel()[(G, (rows + ROWS - 1) // ROWS)](W, E, Mk, H, rows, B, B // const["M"], **const, num_warps=NUM_WARPS)
    for x, y in ((W1, W), (Err1, E), (mask1, Mk != 0)):
        if x.data_ptr() != y.data_ptr():
            x.copy_(y)
