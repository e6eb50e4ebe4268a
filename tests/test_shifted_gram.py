"""The Hessian of stride-1 convs from shifted correlations (kernels/shifted_gram.py) against im2col's product."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnn_sparsegpt.kernels import shifted_gram
from cnn_sparsegpt.kernels.shifted_gram import by_cells, cheaper, conv_gram, offsets
from cnn_sparsegpt.pruning.layer import LayerPruner


def _im2col_gram(x, kernel, padding, y=None, stride=(1, 1)):
    def cols(z):
        X = F.unfold(z.double(), kernel, padding=padding, stride=stride)
        B, _, L = X.shape
        kk = kernel[0] * kernel[1]
        return X.view(B, z.shape[1], kk, L).permute(2, 1, 0, 3).reshape(kk * z.shape[1], B * L)  # (kh, kw, in)
    X = cols(x)
    return (X if y is None else cols(y)) @ X.t()


@pytest.mark.parametrize("shape,kernel,padding", [
    ((3, 4, 7, 6), (3, 3), (1, 1)), ((2, 5, 6, 8), (3, 3), (0, 0)), ((2, 3, 9, 7), (5, 5), (2, 2)),
    ((2, 3, 6, 6), (1, 3), (0, 1)), ((2, 3, 6, 7), (3, 3), (2, 1)), ((1, 2, 3, 3), (3, 3), (1, 1)),
    ((2, 3, 4, 4), (5, 5), (2, 2)), ((2, 3, 4, 5), (3, 3), (1, 1)), ((2, 3, 6, 5), (3, 1), (1, 0))])
# (5×5 at 4×4: offsets with no pixel pairs; 3×1: cells of whole rows)
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("cells, stride", [(False, (1, 1)), (True, (1, 1)), (False, (2, 2)), (True, (2, 2))])
def test_shifted_gram_equals_the_im2col_product(shape, kernel, padding, cross, cells, stride, monkeypatch):
    """Both ways (whole-input GEMMs less the strips outside each window, and cells) on every shape, and both on a
    strided conv's phases."""
    monkeypatch.setattr(shifted_gram, "by_cells", lambda kernel, size, channels=1, cpu=True, phases=False: cells)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    y = torch.randn(shape, generator=g) if cross else None
    R = _im2col_gram(x, kernel, padding, y, stride)
    G = conv_gram(x, kernel, padding, y, out=torch.full(R.shape, float("nan")), stride=stride)  # every block written
    assert G.shape == R.shape and G.dtype == torch.float32
    torch.testing.assert_close(G.double(), R, rtol=1e-5, atol=1e-5 * float(R.abs().max()))
    if not cross:
        assert torch.equal(G, G.t())  # exactly symmetric, as the im2col path makes it
        U = conv_gram(x, kernel, padding, out=torch.full(R.shape, float("nan")), mirror=False, stride=stride)
        taps, C = kernel[0] * kernel[1], shape[1]
        for t in range(taps):  # upper tap blocks written, lower ones left alone
            for t2 in range(taps):
                block, ref = U[t * C:(t + 1) * C, t2 * C:(t2 + 1) * C], G[t * C:(t + 1) * C, t2 * C:(t2 + 1) * C]
                if t2 >= t:
                    torch.testing.assert_close(block, ref, rtol=1e-5, atol=1e-5 * float(R.abs().max()))
                else:
                    assert block.isnan().all()


@pytest.mark.parametrize("shape,kernel,padding,stride", [
    ((2, 3, 9, 8), (3, 3), (1, 1), (3, 3)), ((2, 3, 8, 7), (3, 3), (1, 0), (2, 1)),
    ((2, 3, 7, 8), (3, 3), (0, 1), (1, 2)), ((2, 3, 12, 12), (7, 7), (3, 3), (2, 2)),
    ((2, 3, 5, 5), (3, 3), (1, 1), (2, 2))])
def test_strided_gram_on_phases(shape, kernel, padding, stride):
    """Other strides, mixed ones and a 7×7 stem's shape: the phases' products against im2col's."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    R = _im2col_gram(x, kernel, padding, stride=stride)
    G = conv_gram(x, kernel, padding, out=torch.full(R.shape, float("nan")), stride=stride)
    torch.testing.assert_close(G.double(), R, rtol=1e-5, atol=1e-5 * float(R.abs().max()))
    assert torch.equal(G, G.t())


def test_offsets_and_the_cost_rule():
    assert offsets((3, 3)) == 13 and offsets((3, 3), symmetric=False) == 25 and offsets((1, 1)) == 1
    assert offsets((3, 3), padding=(1, 1), stride=(2, 2)) == 34  # phase pairs and offsets, against 45 tap pairs
    assert cheaper((3, 3), (1, 1), (32, 32), (2, 2), 64) and cheaper((3, 3), (1, 1), (14, 14), (2, 2), 512)
    assert not cheaper((3, 3), (1, 1), (32, 32), (2, 2), 32) and not cheaper((7, 7), (3, 3), (224, 224), (2, 2), 3)
    assert cheaper((3, 3), (1, 1), (112, 112), (2, 2), 64) and not cheaper((3, 3), (1, 1), (16, 16), (2, 2), 64)
    assert cheaper((3, 3), (1, 1), (16, 16), (2, 2), 128) and not cheaper((2, 2), (0, 0), (32, 32), (2, 2), 256)
    # on a GPU (not measured there): strided convs keep im2col, cells only where the appended zeros are 50% or more
    assert not cheaper((3, 3), (1, 1), (32, 32), (2, 2), 64, cpu=False) and cheaper((3, 3), (1, 1), (16, 16), cpu=False)
    assert not by_cells((3, 3), (16, 16), 64, cpu=False) and by_cells((3, 3), (8, 8), 64, cpu=False)
    assert all(cheaper((3, 3), (1, 1), (n, n)) for n in (32, 16, 8, 7, 4, 1))
    assert not cheaper((3, 3), (0, 0), (3, 3)) and not cheaper((1, 1), (0, 0), (32, 32))
    assert by_cells((3, 3), (8, 8)) and by_cells((3, 3), (4, 4)) and not by_cells((3, 3), (16, 16))
    assert by_cells((3, 3), (16, 16), 64) and not by_cells((3, 3), (16, 16), 32) and not by_cells((3, 3), (28, 28), 128)


def _accumulated(conv, x, xd, dense_target, shifted=None, rhs_outputs=None, monkeypatch=None):
    with monkeypatch.context() as m:
        if shifted is not None:
            m.setattr(LayerPruner, "shifted", lambda self, inp: shifted)
        if rhs_outputs is not None:
            m.setattr(LayerPruner, "rhs_from_outputs", lambda self: rhs_outputs)
        p = LayerPruner(conv, "c", dense_target=dense_target)
        for b, bd in zip(x.split(7), xd.split(7)):
            p.add_batch(b, bd)
        return p.nsamples, p.H, p.R


@pytest.mark.parametrize("dense_target", [False, True])
@pytest.mark.parametrize("channels, size, stride, outputs", [(8, 12, 1, 12 * 12), (64, 32, 2, 16 * 16),
                                                          (128, 9, 2, 5 * 5)])
def test_layer_pruner_takes_the_shifted_path_with_the_same_hessian(dense_target, channels, size, stride, outputs,
                                                                    monkeypatch):
    """Stride 1, and stride 2 on the input's phases: whole-phase GEMMs (64 channels at 32²) and cells (128 at 9²)."""
    conv = nn.Conv2d(channels, 6, 3, stride=stride, padding=1, bias=False)
    g = torch.Generator().manual_seed(1)
    x, xd = (torch.randn(20, channels, size, size, generator=g) for _ in range(2))
    assert LayerPruner(conv, "c").shifted(x)
    runs = [_accumulated(conv, x, xd, dense_target, shifted, rhs, monkeypatch)
            for shifted, rhs in ((None, False), (False, False), (None, True))]  # shifted / im2col / R from outputs
    assert all(n == 20 * outputs for n, _, _ in runs)
    ref = runs[1]
    for n, H, R in runs:
        torch.testing.assert_close(H, ref[1], rtol=1e-5, atol=1e-5 * float(ref[1].abs().max()))
        if dense_target:
            torch.testing.assert_close(R, ref[2], rtol=1e-4, atol=1e-5 * float(ref[2].abs().max()))
        else:
            assert R is None


@pytest.mark.parametrize("dense_target", [False, True])
def test_pointwise_convs_sum_h_image_by_image_with_the_same_hessian(dense_target, monkeypatch):
    """A 1×1 conv's H from per-image views (LayerPruner.pointwise) against the copied columns' blocked product."""
    conv = nn.Conv2d(8, 20, 1, bias=False)  # 20 rows >= d/2: the cross term is summed with the columns
    g = torch.Generator().manual_seed(3)
    x, xd = torch.randn(20, 8, 5, 6, generator=g), torch.randn(20, 8, 5, 6, generator=g)
    assert LayerPruner(conv, "c").pointwise(x) and not LayerPruner(conv, "c").pointwise(x[:, :, :2, :2])
    with monkeypatch.context() as m:
        m.setattr(LayerPruner, "pointwise", lambda self, inp: False)
        ref = _accumulated(conv, x, xd, dense_target, monkeypatch=monkeypatch)
    n, H, R = _accumulated(conv, x, xd, dense_target, monkeypatch=monkeypatch)
    assert n == ref[0] == 20 * 5 * 6 and torch.equal(H, H.transpose(-1, -2))
    torch.testing.assert_close(H, ref[1], rtol=1e-5, atol=1e-5 * float(ref[1].abs().max()))
    if dense_target:
        torch.testing.assert_close(R, ref[2], rtol=1e-4, atol=1e-5 * float(ref[2].abs().max()))


def test_strided_padded_and_grouped_1x1_convs_keep_the_columns():
    x = torch.randn(2, 8, 16, 16)
    for conv in (nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(8, 8, 1, padding=1), nn.Conv2d(8, 8, 1, groups=2),
                 nn.Conv2d(8, 8, 3, padding=1)):
        assert not LayerPruner(conv, "c").pointwise(x)


@pytest.mark.parametrize("layer", [nn.Conv2d(8, 4, 3, stride=2, padding=1, groups=2), nn.Linear(24, 5)])
def test_dense_target_rhs_from_outputs_equals_w_times_d(layer, monkeypatch):
    """R = W·D summed from the outputs (a forward and a weight-gradient conv) against W·Σ(X_d − X_p)X_pᵀ."""
    g = torch.Generator().manual_seed(2)
    shape = (12, 8, 9, 9) if isinstance(layer, nn.Conv2d) else (12, 3, 24)
    x, xd = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    _, _, fast = _accumulated(layer, x, xd, True, rhs_outputs=True, monkeypatch=monkeypatch)
    _, _, slow = _accumulated(layer, x, xd, True, rhs_outputs=False, monkeypatch=monkeypatch)
    assert fast.shape == slow.shape
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5 * float(slow.abs().max()))


def test_thin_strided_grouped_and_1x1_convs_keep_im2col():
    x = torch.randn(2, 8, 16, 16)
    for conv in (nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                 nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding="same"), nn.Conv2d(8, 8, 3, dilation=2)):
        assert not LayerPruner(conv, "c").shifted(x)


@pytest.mark.parametrize("d", [100, 300, 1000])
def test_upper_block_sums_mirrored_once_equal_the_full_product(d):
    """The im2col path's sums: each chunk's upper blocks (accumulate_xxt_ without mirroring) added to a float64
    sum (add_upper_), mirrored once (mirror_upper_): exactly symmetric, and XXᵀ up to float rounding."""
    from cnn_sparsegpt.kernels.linalg import accumulate_xxt_, add_upper_, mirror_upper_

    g = torch.Generator().manual_seed(d)
    chunks = [torch.randn(1, d, 64, generator=g) for _ in range(3)]
    S, buf = torch.zeros(1, d, d, dtype=torch.float64), torch.full((1, d, d), float("nan"))
    for X in chunks:
        add_upper_(S, accumulate_xxt_(buf, X, beta=0.0, mirror=False))
    mirror_upper_(S)
    X = torch.cat(chunks, -1).double()
    assert torch.equal(S, S.transpose(1, 2))
    torch.testing.assert_close(S, X @ X.transpose(1, 2), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("shifted, rhs_outputs", [(None, True), (None, False), (False, False)])
def test_unchanged_batches_skip_the_cross_term_with_the_same_sums(shifted, rhs_outputs, monkeypatch):
    """Batches whose dense inputs equal the pruned ones (no pruned layer upstream) add exactly 0 to the dense
    target's cross term: skipped (R from the outputs, or with the chunks on the shifted and im2col paths), the same
    R, H and input means as when computed."""
    import cnn_sparsegpt.pruning.layer as layer_module

    conv = nn.Conv2d(8, 6, 3, padding=1, bias=False)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(21, 8, 10, 10, generator=g)
    xd = torch.cat([x[:14], torch.randn(7, 8, 10, 10, generator=g)])  # two unchanged batches of 7, one changed

    def run(skip):
        calls = []
        with monkeypatch.context() as m:
            if not skip:
                m.setattr(layer_module.torch, "equal", lambda a, b: False)
            m.setattr(layer_module, "conv_gram", lambda *a, **k: (calls.append(k.get("y") is not None),
                                                                   conv_gram(*a, **k))[1])
            m.setattr(LayerPruner, "_rhs_product", lambda self, *a: (calls.append(True),
                                                                      orig_rhs(self, *a))[1])
            if shifted is False:  # the im2col path: the cross term's columns are a second call per chunk
                m.setattr(LayerPruner, "columns", lambda self, inp: (calls.append(True), orig_columns(self, inp))[1])
            if shifted is not None:
                m.setattr(LayerPruner, "shifted", lambda self, inp: shifted)
            m.setattr(LayerPruner, "rhs_from_outputs", lambda self: rhs_outputs)
            p = LayerPruner(conv, "c", track_mean=True, dense_target=True)
            for b, bd in zip(x.split(7), xd.split(7)):
                p.add_batch(b, bd)
            means = p.input_mean(), p.input_mean(dense=True)
            return p.H, p.R, means, sum(calls) - (3 if shifted is False else 0)  # (the 3 batches' own columns)

    orig_rhs, orig_columns = LayerPruner._rhs_product, LayerPruner.columns
    H, R, means, cross = run(skip=True)
    H0, R0, means0, cross0 = run(skip=False)
    assert (cross, cross0) == (1, 3)  # one cross product per changed batch, whichever way it is summed
    assert torch.count_nonzero(R) > 0
    for a, b in ((H, H0), (R, R0), (means[0], means0[0]), (means[1], means0[1])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("conv", [nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 1, stride=2), nn.Conv2d(8, 6, 1, groups=2),
                                  nn.Conv2d(8, 6, 1, stride=(2, 1)), nn.Conv2d(8, 6, 1, padding="same")])
def test_pointwise_columns_are_the_inputs_as_unfold_gives_them(conv):
    """A 1×1 conv's columns (LayerPruner.columns) are its strided input reordered, without unfolding: the same values
    in the same order as F.unfold's."""
    x = torch.randn(3, 8, 7, 5, generator=torch.Generator().manual_seed(5))
    p = LayerPruner(conv, "c")
    X = F.unfold(x, 1, stride=conv.stride)  # (B, C, L)
    ref = X.view(3, p.groups, 8 // p.groups, -1).permute(1, 2, 0, 3).reshape(p.groups, p.d, -1)
    assert torch.equal(p.columns(x), ref)
