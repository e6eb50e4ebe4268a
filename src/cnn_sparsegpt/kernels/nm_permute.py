"""A channel order under which an N:M mask keeps more (Pool & Yu, "Channel Permutations for N:M Sparsity", 2021).

N:M groups are M consecutive input channels at each kernel tap, so which channels share a group is an accident of
the order training left them in. Reordering the channels (the producers' rows and the consumers' columns alike)
leaves the network's function unchanged but changes what an N:M mask can keep. The search here works on a saliency
matrix S (rows: every consumer row and tap that reads the channels; columns: the channels) and maximises the kept
saliency Σ_rows Σ_groups (sum of the N largest of the group's M entries) by greedy swaps of two channels in different
groups, each time the swap that gains most, until none gains.

The gain of every swap is known in closed form. Take channel a out of its group A: the other M−1 keep T_a (the sum
of their N largest) and θ_a (their N-th largest), per row. Put channel b in: the group keeps T_a + relu(S_b − θ_a).
So swapping a ∈ A and b ∈ B gains
    u_a + u_b + P[a, b] + P[b, a],   u_a = Σ_r (T_a − K_A),   P[a, b] = Σ_r relu(S[r, b] − θ_a[r]),
K_A being the group's kept sum now. A swap changes u, θ and the rows of P of its two groups' 2M channels only, so
each step after the first costs 2M·C·R, not C²·R.
"""
from __future__ import annotations

import torch

MAX_CHUNK = 1 << 24  # elements of one broadcast block when P's rows are computed (64 MB in float32)
MAX_ROWS = 2048  # rows the search reads (evenly spaced): each swap costs 2M·C·rows; ResNet-20's groups have fewer


def kept_saliency(S: torch.Tensor, n: int, m: int, order: torch.Tensor | None = None) -> float:
    """Σ over rows and groups of M consecutive columns (after `order`) of the N largest entries of S (R, C)."""
    S = S if order is None else S[:, order]
    return float(S.reshape(S.shape[0], -1, m).topk(n, dim=-1).values.sum())


def _leave_one_out(S: torch.Tensor, members: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For groups `members` (k, M) of columns of S: u (k, M), the kept sum each member's removal loses, and θ
    (R, k, M), the N-th largest of the other M−1 per row."""
    m = members.shape[1]
    V = S[:, members]  # (R, k, M)
    others = torch.tensor([[j for j in range(m) if j != i] for i in range(m)], device=S.device)
    top = V[:, :, others].topk(n, dim=-1).values  # (R, k, M, N): the others' N largest
    kept = V.topk(n, dim=-1).values.sum(-1)  # (R, k)
    return (top.sum(-1) - kept[..., None]).sum(0), top[..., -1]


def _relu_rows(S: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """P rows (len(theta's columns), C): Σ_r relu(S[r, b] − θ[r, a]) for each a (a column of theta) and b."""
    R, C = S.shape
    step = max(1, MAX_CHUNK // max(R * C, 1))
    return torch.cat([(S[:, None, :] - theta[:, i:i + step, None]).clamp_min_(0).sum(0)
                      for i in range(0, theta.shape[1], step)])


@torch.no_grad()
def permutation_search(S: torch.Tensor, n: int, m: int, max_swaps: int | None = None,
                       tol: float = 1e-6) -> tuple[torch.Tensor, int]:
    """The channel order (order[j] = the column of S that goes to position j) reached by greedy gainful swaps from
    the identity, and the number of swaps. S (R, C) is non-negative, C a multiple of M; a swap must gain more than
    tol times the kept saliency it starts from (float rounding is no gain). max_swaps default: 4·C. Of more than
    MAX_ROWS rows, MAX_ROWS evenly spaced ones are searched on (a sample of the same sum)."""
    R, C = S.shape
    if C % m or C <= m or not 0 < n < m:
        return torch.arange(C, device=S.device), 0
    if R > MAX_ROWS:
        S = S[torch.linspace(0, R - 1, MAX_ROWS, device=S.device).round().long()]
        R = MAX_ROWS
    S = S.float()
    order = torch.arange(C, device=S.device)
    position = torch.arange(C, device=S.device)  # of each column: order's inverse
    u = torch.empty(C, device=S.device)
    theta = torch.empty(R, C, device=S.device)
    members = order.view(-1, m)
    uu, th = _leave_one_out(S, members, n)
    u[members.flatten()] = uu.flatten()
    theta[:, members.flatten()] = th.reshape(R, -1)
    P = _relu_rows(S, theta)
    floor = tol * max(kept_saliency(S, n, m), 1e-30)
    swaps, limit = 0, max_swaps if max_swaps is not None else 4 * C
    while swaps < limit:
        gain = u[:, None] + u[None, :] + P + P.T
        group = position // m
        gain[group[:, None] == group[None, :]] = -float("inf")
        best = int(gain.argmax())
        a, b = divmod(best, C)
        if not gain[a, b] > floor:
            break
        pa, pb = int(position[a]), int(position[b])
        order[pa], order[pb] = b, a
        position[a], position[b] = pb, pa
        changed = order.view(-1, m)[[pa // m, pb // m]]  # the two groups' members now
        uu, th = _leave_one_out(S, changed, n)
        cols = changed.flatten()
        u[cols] = uu.flatten()
        theta[:, cols] = th.reshape(R, -1)
        P[cols] = _relu_rows(S, theta[:, cols])
        swaps += 1
    return order, swaps
