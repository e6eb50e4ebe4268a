"""ExactOBS (kernels/exact_obs.py) against a float64 brute force: a greedy that tries every remaining weight with a
full least-squares re-fit at each step."""
import pytest
import torch

from cnn_sparsegpt.kernels.exact_obs import _row_counts, exact_obs_solve
from cnn_sparsegpt.kernels.linalg import damped
from cnn_sparsegpt.kernels.masks import Pattern


def _refit(w, H, removed):
    """argmin (w - v)ᵀ H (w - v) over v with v[removed] = 0, and its error."""
    d = len(w)
    keep = torch.ones(d, dtype=torch.bool)
    keep[list(removed)] = False
    v = torch.zeros_like(w)
    if keep.any():
        S, R = ~keep, keep
        v[R] = w[R] + torch.linalg.solve(H[R][:, R], H[R][:, S] @ w[S])
    return v, float((w - v) @ H @ (w - v))


def _brute_force(w, H, steps, eligible=lambda removed, j: True):
    removed, curve, weights = [], [], [w.clone()]
    for _ in range(steps):
        best = min(((_refit(w, H, removed + [j])[1], j) for j in range(len(w)) if j not in removed
                    and eligible(removed, j)))
        removed.append(best[1])
        curve.append(best[0])
        weights.append(_refit(w, H, removed)[0])
    return removed, curve, weights


def _problem(rows=3, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, 64, generator=g, dtype=torch.float64)
    X[1] += 0.8 * X[0]  # correlated inputs: the order matters
    return torch.randn(rows, d, generator=g, dtype=torch.float64), 2 * X @ X.T / 64


def test_nm_agrees_with_a_float64_brute_force():
    W, H = _problem()
    Q, pruned, _ = exact_obs_solve(W[None], H[None], Pattern(n=2, m=4), 0.01, dtype=torch.float64)
    Hd = damped(H[None], 0.01)[0]
    for r in range(W.shape[0]):
        def eligible(removed, j):
            return sum(i // 4 == j // 4 for i in removed) < 2
        removed, _, weights = _brute_force(W[r], Hd, 6, eligible)
        assert set(pruned[0, r].nonzero().flatten().tolist()) == set(removed)
        torch.testing.assert_close(Q[0, r], weights[-1], rtol=1e-9, atol=1e-9)


def test_unstructured_agrees_with_a_float64_brute_force():
    W, H = _problem(rows=4, d=10, seed=1)
    Q, pruned, losses = exact_obs_solve(W[None], H[None], Pattern(sparsity=0.5), 0.01, dtype=torch.float64)
    Hd = damped(H[None], 0.01)[0]
    curves, refs = [], []
    for r in range(W.shape[0]):
        removed, curve, weights = _brute_force(W[r], Hd, 10)
        increments = torch.tensor(curve).diff(prepend=torch.zeros(1, dtype=torch.float64))
        torch.testing.assert_close(losses[0, r], increments, rtol=1e-6, atol=1e-9)  # OBS increments are exact
        curves.append(increments)
        refs.append((removed, weights))
    counts = _row_counts(torch.stack(curves), 20)
    assert int(pruned.sum()) == 20 and counts.sum() == 20
    for r, (removed, weights) in enumerate(refs):
        c = int(counts[r])
        assert set(pruned[0, r].nonzero().flatten().tolist()) == set(removed[:c])
        torch.testing.assert_close(Q[0, r], weights[c], rtol=1e-9, atol=1e-9)


def test_row_counts_take_the_cheapest_prefixes():
    curve = torch.tensor([[1.0, 2.0, 9.0], [0.5, 3.0, 4.0], [0.1, 0.2, 0.3]], dtype=torch.float64)
    assert _row_counts(curve, 4).tolist() == [0, 1, 3]  # 0.1, 0.2, 0.3, then 0.5
    assert _row_counts(torch.tensor([[5.0, 1.0], [2.0, 3.0]]), 2).tolist() == [0, 2]  # 5 then 1 counts as 5, 5


@pytest.mark.parametrize("pattern", [Pattern(n=2, m=4), Pattern(sparsity=0.7)])
def test_pruned_weights_are_exactly_zero(pattern):
    """Later steps' updates gave removed weights rounding noise back (a 2:4 layer fed 16 samples for 72 inputs, a
    squeeze-excitation conv of MobileNetV3 with few images, kept 39 exact zeros of 864 pruned)."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(72, 16, generator=g)
    W, H = torch.randn(1, 24, 72, generator=g), (2 * X @ X.t() / 16)[None]
    Q, pruned, _ = exact_obs_solve(W, H, pattern, 0.01)
    assert int(pruned.sum()) == round(pattern.target * W.numel())
    assert torch.equal(Q == 0, pruned)


@pytest.mark.parametrize("pattern", [Pattern(n=2, m=4), Pattern(sparsity=0.7)])
def test_float32_batches_match_float64(pattern):
    W, H = _problem(rows=9, d=16, seed=2)
    Q64, p64, _ = exact_obs_solve(W[None], H[None], pattern, 0.01, dtype=torch.float64)
    Q32, p32, _ = exact_obs_solve(W[None].float(), H[None].float(), pattern, 0.01)
    assert (p64 == p32).float().mean() > 0.95
    assert int(p32.sum()) == int(p64.sum())


def test_error_curve_is_the_solves_error_at_each_level():
    """One greedy pass gives every level's error (OBC's database): equal to solving at that level."""
    from cnn_sparsegpt.kernels.exact_obs import exact_error_curve
    from cnn_sparsegpt.kernels.solver import relative_error

    W, H = _problem(rows=5, d=16, seed=3)
    levels = [0.0, 0.3, 0.6, 0.9]
    curve = exact_error_curve(W[None], H[None], levels, 0.01, dtype=torch.float64)
    Hd = damped(H[None], 0.01)
    for s, e in zip(levels, curve):
        Q, _, _ = exact_obs_solve(W[None], H[None], Pattern(sparsity=s), 0.01, dtype=torch.float64)
        torch.testing.assert_close(e, relative_error(W[None], Q, Hd), rtol=1e-6, atol=1e-12)
