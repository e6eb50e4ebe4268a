"""Mask builders and pattern parsing: exact counts, exact sparsity, idempotence (property tests)."""
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cnn_sparsegpt import PUBLISHED, LayerPruner, Pattern, UserError
from cnn_sparsegpt.kernels.masks import nm_prune_mask, topk_prune_mask
from cnn_sparsegpt.kernels.masks import pattern_prune_mask


nm_pairs = st.integers(2, 8).flatmap(lambda m: st.tuples(st.integers(1, m - 1), st.just(m)))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), groups=st.integers(1, 6), nm=nm_pairs, seed=st.integers(0, 2**16))
def test_nm_exact_count_per_group(rows, groups, nm, seed):
    n, m = nm
    scores = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    pruned = nm_prune_mask(scores, n, m)
    assert torch.all((~pruned).view(rows, groups, m).sum(-1) == n)
    kept_min = scores.masked_fill(pruned, float("inf")).view(rows, groups, m).min(-1).values
    dropped_max = scores.masked_fill(~pruned, -1).view(rows, groups, m).max(-1).values
    assert torch.all(dropped_max <= kept_min)  # the lowest scores go


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 40), s=st.floats(0, 0.99), per_row=st.booleans(),
       seed=st.integers(0, 2**16))
def test_unstructured_exact_sparsity(rows, cols, s, per_row, seed):
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    pruned = pattern_prune_mask(scores, Pattern(sparsity=s), per_row=per_row)
    assert pruned.sum().item() == round(s * rows * cols)  # the layer's count, whether per row or not
    if per_row:  # each row within one weight of its share, and the lowest scores of the row go
        assert torch.all((pruned.sum(1) - s * cols).abs() < 1)
        kept_min = scores.masked_fill(pruned, float("inf")).min(1).values
        dropped_max = scores.masked_fill(~pruned, -1).max(1).values
        assert torch.all(dropped_max <= kept_min)


@settings(max_examples=60, deadline=None)
@given(mats=st.integers(1, 3), n=st.integers(1, 60), levels=st.integers(1, 4), frac=st.floats(0, 1),
       seed=st.integers(0, 2**16))
def test_topk_mask_takes_exactly_k_with_ties(mats, n, levels, frac, seed):
    """Few distinct scores (ties, as dead inputs' zeros make): exactly k per matrix, none kept below one pruned."""
    scores = torch.randint(0, levels, (mats, 2, n), generator=torch.Generator().manual_seed(seed)).float()
    k = round(frac * 2 * n)
    pruned = topk_prune_mask(scores, k).flatten(1)
    assert torch.all(pruned.sum(-1) == k)
    kept_min = scores.flatten(1).masked_fill(pruned, float("inf")).min(-1).values
    dropped_max = scores.flatten(1).masked_fill(~pruned, -1).max(-1).values
    assert torch.all(dropped_max <= kept_min)


@settings(max_examples=25, deadline=None)
@given(cin=st.sampled_from([4, 8, 16]), cout=st.integers(1, 6), k=st.sampled_from([1, 3]),
       pattern=st.sampled_from([Pattern(sparsity=0.5), Pattern(sparsity=0.8), Pattern(n=2, m=4),
                                Pattern(n=1, m=4)]),
       method=st.sampled_from(["magnitude", "wanda", "sparsegpt"]), seed=st.integers(0, 1000))
def test_pruning_is_idempotent(cin, cout, k, pattern, method, seed):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2)
    x = torch.randn(8, cin, 5, 5)
    for step in range(2):
        p = LayerPruner(conv, "c")
        p.add_batch(x)
        res = p.prune(replace(PUBLISHED, method=method), pattern)
        if step == 0:
            first = conv.weight.detach().clone()
    # pruned weights are already zero, so they are chosen again and their OBS error (hence update) is zero
    assert torch.equal(conv.weight, first)
    assert torch.all(conv.weight[~res.mask] == 0)


def test_topk_zero_k():
    assert not topk_prune_mask(torch.rand(3, 4), 0).any()


@pytest.mark.parametrize("sparsity,nm,msg", [
    (None, "4:4", "1 <= N < M"), (None, "3:2", "1 <= N < M"), (None, "0:4", "1 <= N < M"),
    (None, "2:0", "1 <= N < M"), (None, "2.5:4", "two integers"), (None, "a:b", "two integers"),
    (1.0, None, "[0, 1)"), (-0.1, None, "[0, 1)"), ("x", None, "a number"),
    (0.5, "2:4", "exactly one"), (None, None, "exactly one"),
])
def test_pattern_errors(sparsity, nm, msg):
    with pytest.raises(UserError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Pattern.parse(sparsity, nm)


def test_pattern_parse():
    assert Pattern.parse(nm="2:4") == Pattern(n=2, m=4) and Pattern.parse(nm="2:4").target == 0.5
    assert str(Pattern.parse(0.7)) == "0.7"
