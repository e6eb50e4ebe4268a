"""glibc's heap kept for reuse while a prune runs (pruning/heap.py)."""
import torch

from cnn_sparsegpt import PUBLISHED, prune_model
from cnn_sparsegpt.pruning import heap

from .test_prune_model import TinyResNet, calib, make


def test_reuse_is_off_when_not_asked_and_nests_once():
    with heap.reuse_freed_memory(False) as on:
        assert on is False
    glibc = heap._glibc() is not None
    with heap.reuse_freed_memory() as outer:
        assert outer is glibc
        with heap.reuse_freed_memory() as inner:
            assert inner is glibc and heap._depth[0] == (2 if glibc else 0)
        assert heap._depth[0] == (1 if glibc else 0)  # the inner exit left the outer block's settings alone
        x = torch.randn(64, 2**18)  # 64 MB: from the heap in the block
        del x
    assert heap._depth[0] == 0


def test_default_policy_reuses_memory_and_low_memory_does_not():
    x = calib(64)
    reports = {low: prune_model(make(TinyResNet), x, PUBLISHED, nm="2:4", low_memory=low, progress=False)
               for low in (False, True)}
    reused = heap._glibc() is not None
    assert ("freed memory kept for reuse" in reports[False].memory_policy) is reused
    assert "reuse" not in reports[True].memory_policy
    for a, b in zip(reports[False].layers, reports[True].layers):
        assert a.mask is None or torch.equal(a.mask, b.mask)
