"""The Hessian of stride-1 convs from shifted correlations (kernels/shifted_gram.py) against im2col's product."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnn_sparsegpt.kernels.shifted_gram import cheaper, conv_gram, offsets
from cnn_sparsegpt.pruning.layer import LayerPruner


def _im2col_gram(x, kernel, padding, y=None):
    def cols(z):
        X = F.unfold(z.double(), kernel, padding=padding)
        B, _, L = X.shape
        kk = kernel[0] * kernel[1]
        return X.view(B, z.shape[1], kk, L).permute(2, 1, 0, 3).reshape(kk * z.shape[1], B * L)  # (kh, kw, in)
    X = cols(x)
    return (X if y is None else cols(y)) @ X.t()


@pytest.mark.parametrize("shape,kernel,padding", [
    ((3, 4, 7, 6), (3, 3), (1, 1)), ((2, 5, 6, 8), (3, 3), (0, 0)), ((2, 3, 9, 7), (5, 5), (2, 2)),
    ((2, 3, 6, 6), (1, 3), (0, 1)), ((2, 3, 6, 7), (3, 3), (2, 1)), ((1, 2, 3, 3), (3, 3), (1, 1))])
@pytest.mark.parametrize("cross", [False, True])
def test_shifted_gram_equals_the_im2col_product(shape, kernel, padding, cross):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    y = torch.randn(shape, generator=g) if cross else None
    G, R = conv_gram(x, kernel, padding, y), _im2col_gram(x, kernel, padding, y)
    assert G.shape == R.shape and G.dtype == torch.float32
    torch.testing.assert_close(G.double(), R, rtol=1e-5, atol=1e-5 * float(R.abs().max()))
    if not cross:
        assert torch.equal(G, G.t())  # exactly symmetric, as the im2col path makes it


def test_offsets_and_the_cost_rule():
    assert offsets((3, 3)) == 13 and offsets((3, 3), symmetric=False) == 25 and offsets((1, 1)) == 1
    assert cheaper((3, 3), (1, 1), (32, 32)) and cheaper((3, 3), (1, 1), (8, 8))
    assert not cheaper((3, 3), (1, 1), (4, 4)) and not cheaper((1, 1), (0, 0), (32, 32))


@pytest.mark.parametrize("dense_target", [False, True])
def test_layer_pruner_takes_the_shifted_path_with_the_same_hessian(dense_target, monkeypatch):
    conv = nn.Conv2d(8, 6, 3, padding=1, bias=False)
    g = torch.Generator().manual_seed(1)
    x, xd = torch.randn(20, 8, 12, 12, generator=g), torch.randn(20, 8, 12, 12, generator=g)
    fast = LayerPruner(conv, "c", dense_target=dense_target)
    assert fast.shifted(x)
    for b, bd in zip(x.split(7), xd.split(7)):
        fast.add_batch(b, bd)
    monkeypatch.setattr(LayerPruner, "shifted", lambda self, inp: False)
    slow = LayerPruner(conv, "c", dense_target=dense_target)
    for b, bd in zip(x.split(7), xd.split(7)):
        slow.add_batch(b, bd)
    assert fast.nsamples == slow.nsamples == 20 * 12 * 12
    torch.testing.assert_close(fast.H, slow.H, rtol=1e-5, atol=1e-5 * float(slow.H.abs().max()))
    if dense_target:
        torch.testing.assert_close(fast.D, slow.D, rtol=1e-5, atol=1e-5 * float(slow.D.abs().max()))


def test_strided_grouped_and_1x1_convs_keep_im2col():
    x = torch.randn(2, 8, 16, 16)
    for conv in (nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                 nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding="same"), nn.Conv2d(8, 8, 3, dilation=2)):
        assert not LayerPruner(conv, "c").shifted(x)
