"""prune_model on small networks: residual + BatchNorm, layer choice, both executors, reports, masks."""
import copy
import warnings

import pytest
import torch
from torch import nn

from cnn_sparsegpt import PUBLISHED, UserError, prune_model
from cnn_sparsegpt.pruning.prune import forward_order


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block = Block(8, 16, 2)
        self.fc1 = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.block(torch.relu(self.bn(self.stem(x))))
        return self.fc(torch.relu(self.fc1(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))))


class Untraceable(TinyResNet):
    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace this
            return super().forward(x)
        return x


def make(cls=TinyResNet, seed=0):
    torch.manual_seed(seed)
    model = cls()
    model.train()
    with torch.no_grad():  # non-trivial BN statistics
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8) * 2 + 0.5)
    return model.eval()


def calib(n=64, seed=1):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_order_and_default_skips():
    model = make()
    assert forward_order(model, calib(1)) == ["stem", "block.conv1", "block.conv2", "block.down.0", "fc1", "fc"]
    rep = prune_model(model, calib(), PUBLISHED, method="sparsegpt", nm="2:4", progress=False)
    by = {r.name: r for r in rep.layers}
    assert by["stem"].skipped and "first conv" in by["stem"].reason
    assert by["fc"].skipped and "last linear" in by["fc"].reason
    for name in ("block.conv1", "block.conv2", "block.down.0", "fc1"):
        assert not by[name].skipped and by[name].sparsity == 0.5 and by[name].error < 1
    assert rep.forward_passes == 1 and rep.sparsity == 0.5
    assert set(rep.masks) == {"block.conv1.weight", "block.conv2.weight", "block.down.0.weight", "fc1.weight"}
    for name, mask in rep.masks.items():
        w = model.get_parameter(name)
        assert mask.shape == w.shape and mask.dtype == torch.bool and torch.all(w[~mask] == 0)


def test_layers_of_other_kinds_are_listed_and_left_alone():
    """A ConvTranspose3d whose kernel is not its stride, or a conv whose weight is computed from other parameters
    (weight_norm), is not pruned, and
    the report says so instead of leaving it out; a plain ConvTranspose2d beside them is pruned (test_conv_views.py)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(16, 8, 2, stride=2), nn.ReLU(),
                          nn.utils.parametrizations.weight_norm(nn.ConvTranspose2d(8, 8, 1)), nn.Unflatten(1, (1, 8)),
                          nn.ConvTranspose3d(1, 1, 3, padding=1), nn.Flatten(1, 2), nn.Conv2d(8, 8, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    before = {k: model[k].weight.detach().clone() for k in (6, 8)}
    with pytest.warns(RuntimeWarning) as seen:  # one warning per reason, as for a nonstandard Conv2d
        rep = prune_model(model, calib(), PUBLISHED, nm="2:4", progress=False)
    said = [str(w.message) for w in seen]
    assert any(m.startswith("1 layer (8): a ConvTranspose3d is pruned where") for m in said)
    assert any(m.startswith("1 layer (6): its weight is computed") and "remove_parametrizations" in m for m in said)
    by = {r.name: r for r in rep.layers}
    assert by["8"].skipped and "a ConvTranspose3d is pruned where its kernel equals its stride" in by["8"].reason
    assert by["8"].shape == [1, 1, 3, 3, 3]
    assert by["6"].skipped and "weight_norm" in by["6"].reason
    for k in (6, 8):
        assert torch.equal(model[k].weight, before[k]) and f"{k}.weight" not in rep.masks
    assert not by["4"].skipped and by["4"].shape == [16, 8, 2, 2] and rep.masks["4.weight"].shape == (16, 8, 2, 2)
    assert not by["2"].skipped and not by["10"].skipped and rep.sparsity == 0.5


def test_ignore_and_prune_all():
    model = make()
    rep = prune_model(model, calib(), PUBLISHED, method="magnitude", sparsity=0.5, ignore=["block\\.conv.*"],
                      prune_all=True,
                      progress=False)
    by = {r.name: r for r in rep.layers}
    assert not by["stem"].skipped and not by["fc"].skipped
    assert by["block.conv1"].skipped and by["block.conv2"].skipped and "ignore" in by["block.conv1"].reason


def test_fx_and_hook_paths_agree_without_bn_recalibration():
    a, b = make(), make()
    ra = prune_model(a, calib(), PUBLISHED, method="sparsegpt", sparsity=0.6, bn_recalibration=False, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rb = prune_model(b, calib(), PUBLISHED, method="sparsegpt", sparsity=0.6, bn_recalibration=False,
                         progress=False, use_fx=False)
    assert rb.forward_passes == 4  # one (truncated) pass per pruned layer
    for x, y in zip(ra.layers, rb.layers):
        assert x.skipped == y.skipped
        if not x.skipped:
            assert torch.equal(x.mask, y.mask)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_untraceable_model_falls_back():
    model = make(Untraceable)
    with pytest.warns(RuntimeWarning, match="cannot trace"):
        rep = prune_model(model, calib(), PUBLISHED, method="sparsegpt", nm="2:4", progress=False)
    assert rep.forward_passes == 5  # 4 layers + the BatchNorm recalibration pass
    assert rep.sparsity == 0.5 and rep.bn_recalibrated


def test_sequential_inputs_come_from_pruned_layers():
    """Layer 2's Hessian must see layer 1's pruned output: pruning both at once from dense inputs differs."""
    model = make()
    rep = prune_model(copy.deepcopy(model), calib(), PUBLISHED, method="sparsegpt", sparsity=0.7,
                      bn_recalibration=False, progress=False)
    only_first = copy.deepcopy(model)
    prune_model(only_first, calib(), PUBLISHED, method="sparsegpt", sparsity=0.7, ignore=["block.conv2",
                "block.down.0", "fc1"],
                bn_recalibration=False, progress=False)
    seq = prune_model(only_first, calib(), PUBLISHED, method="sparsegpt", sparsity=0.7,
                      ignore=["block.conv1", "block.down.0", "fc1"], bn_recalibration=False, progress=False)
    by_all = {r.name: r for r in rep.layers}
    by_seq = {r.name: r for r in seq.layers}
    assert torch.equal(by_all["block.conv2"].mask, by_seq["block.conv2"].mask)


def test_bn_recalibration():
    model = make()
    before = model.block.bn2.running_mean.clone()
    momentum = model.block.bn2.momentum
    prune_model(model, calib(), PUBLISHED, method="magnitude", sparsity=0.8, progress=False)
    assert not torch.allclose(model.block.bn2.running_mean, before)
    assert model.block.bn2.momentum == momentum and not model.training
    # the statistics are those of the pruned network on the calibration data
    feats = {}
    h = model.block.bn2.register_forward_pre_hook(lambda m, i: feats.setdefault("x", i[0]))
    with torch.no_grad():
        model(calib())
    h.remove()
    torch.testing.assert_close(model.block.bn2.running_mean, feats["x"].mean((0, 2, 3)), rtol=1e-4, atol=1e-5)

    off = make()
    prune_model(off, calib(), PUBLISHED, method="magnitude", sparsity=0.8, bn_recalibration=False, progress=False)
    assert torch.equal(off.block.bn2.running_mean, before)


def test_sparsegpt_beats_magnitude_on_output():
    x = calib(128, seed=5)
    dense = make()
    with torch.no_grad():
        ref = dense(x)
    errs = {}
    for method in ("magnitude", "sparsegpt"):
        m = make()
        prune_model(m, calib(128), PUBLISHED, method=method, sparsity=0.7, bn_recalibration=False, progress=False)
        with torch.no_grad():
            errs[method] = (m(x) - ref).pow(2).mean().item()
    assert errs["sparsegpt"] < errs["magnitude"]


def test_a_compiled_model_is_pruned_through_the_module_it_wraps():
    """torch.compile's wrapper: pruned on the traced graph of the module it wraps (never compiled here), the report
    naming that module's layers, and keep_masks takes the wrapper too."""
    from cnn_sparsegpt import keep_masks

    torch.manual_seed(0)
    plain, inner = make(), make()
    inner.load_state_dict(plain.state_dict())
    compiled = torch.compile(inner)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "cannot trace OptimizedModule" fallback)
        rep = prune_model(compiled, calib(), PUBLISHED, nm="2:4", progress=False)
    ref = prune_model(plain, calib(), PUBLISHED, nm="2:4", progress=False)
    assert rep.masks.keys() == ref.masks.keys() and all(torch.equal(rep.masks[k], m) for k, m in ref.masks.items())
    keep_masks(compiled, rep.masks)


def test_batches_of_pairs_and_determinism():
    loader = [(calib(32, s), torch.zeros(32)) for s in (1, 2)]
    masks = []
    for _ in range(2):
        rep = prune_model(make(), loader, PUBLISHED, method="sparsegpt", nm="2:4", progress=False)
        masks.append(rep.masks)
    assert rep.nsamples == 64
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(calib(1100), torch.zeros(1100)),
                                         batch_size=100)  # a training set's DataLoader: not read to its end
    with pytest.warns(RuntimeWarning, match="read the first 1024 images of the iterable"):
        assert prune_model(make(), loader, PUBLISHED, nm="2:4", progress=False).nsamples == 1024
    assert prune_model(make(), loader, PUBLISHED, nm="2:4", progress=False, nsamples=150).nsamples == 150
    assert prune_model(make(), calib(), PUBLISHED, nm="2:4", progress=False, nsamples=10).nsamples == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tensor is taken whole
        assert prune_model(make(), calib(1100), PUBLISHED, nm="2:4", progress=False).nsamples == 1100
    with pytest.raises(UserError, match="nsamples must be at least 1"):
        prune_model(make(), calib(), PUBLISHED, nm="2:4", progress=False, nsamples=0)
    for bad, said in (([{"image": calib(4)}], "got dict: pass the input tensors"),
                      ([], "the calibration set is empty")):
        with pytest.raises(UserError, match=said):
            prune_model(make(), bad, PUBLISHED, nm="2:4", progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    cpu, gpu = make(), make().cuda()
    rc = prune_model(cpu, calib(), PUBLISHED, method="sparsegpt", nm="2:4", progress=False)
    rg = prune_model(gpu, calib().cuda(), PUBLISHED, method="sparsegpt", nm="2:4", progress=False)
    assert all(p.is_cuda for p in gpu.parameters())
    agree = [(rc.masks[k] == rg.masks[k]).float().mean().item() for k in rc.masks]
    assert min(agree) > 0.98  # float32 on different hardware may flip near-ties


class InPlaceNet(nn.Module):
    """In-place ops on tensors that the low-memory executor recomputes from."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = nn.functional.relu(self.stem(x), inplace=True)
        y = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y += x
        y = y.relu_()
        return self.fc(self.fc1(y.mean((2, 3))))


@pytest.mark.parametrize("cls", [TinyResNet, InPlaceNet])
def test_low_memory_matches_default(cls):
    a, b = make(cls), make(cls)
    ra = prune_model(a, calib(), PUBLISHED, method="sparsegpt", nm="2:4", batch_size=16, progress=False)
    rb = prune_model(b, calib(), PUBLISHED, method="sparsegpt", nm="2:4", batch_size=16, progress=False,
                     low_memory=True)
    assert ra.forward_passes == 1 and rb.forward_passes > 1
    assert rb.peak_stored_mb < ra.peak_stored_mb
    assert ra.masks.keys() == rb.masks.keys()
    assert all(torch.equal(ra.masks[k], rb.masks[k]) for k in ra.masks)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert all(m.inplace for m in b.modules() if isinstance(m, nn.ReLU))  # restored after the run


@pytest.mark.slow  # > 6 s on 2 cores
def test_low_memory_keeps_one_activation_in_residual_blocks():
    """Block input + current layer input (two activations) by default; about one with low_memory."""
    from cnn_sparsegpt import create_model
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    act_mb = x.shape[0] * 64 * 32 * 32 * 4 / 2**20  # the largest activation: layer1's
    peaks = {}
    for low in (False, True):
        model = create_model("resnet18_cifar").eval()
        rep = prune_model(model, x, PUBLISHED, method="magnitude", sparsity=0.5, batch_size=8, progress=False,
                          low_memory=low)
        peaks[low] = rep.peak_stored_mb
    assert peaks[False] >= 2 * act_mb
    assert peaks[True] <= 1.3 * act_mb + x.numel() * 4 / 2**20  # + the calibration batches themselves


@pytest.mark.parametrize("name", ["mobilenet_v2", "squeezenet1_1", "shufflenet_v2_x0_5"])
def test_low_memory_matches_default_on_torchvision(name):
    """Inverted residuals, concatenations, channel shuffles, in-place ReLU6: the same masks and weights."""
    torchvision = pytest.importorskip("torchvision")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reports, states = [], []
    for low in (False, True):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(num_classes=10).eval()
        reports.append(prune_model(model, x, PUBLISHED, method="sparsegpt", nm="2:4", batch_size=4, progress=False,
                                   low_memory=low))
        states.append(model.state_dict())
    assert reports[0].forward_passes == 1 and reports[1].forward_passes >= 1
    assert all(torch.equal(reports[0].masks[k], reports[1].masks[k]) for k in reports[0].masks)
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-5, atol=1e-6, msg=k)
    # BatchNorm statistics (most from the pruned convs' sums) are those of a pass over the pruned network
    assert_statistics_of_a_pass(model, x, 4, [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)], rtol=1e-4)


def assert_statistics_of_a_pass(model, x, batch_size, bns, rtol):
    """Each BatchNorm's running mean and variance are those of its inputs over x in the (pruned) model, in float64."""
    feats = {bn: [] for bn in bns}
    hooks = [bn.register_forward_pre_hook(lambda m, i: feats[m].append(i[0].double())) for bn in bns]
    with torch.no_grad():
        for b in x.split(batch_size):
            model(b)
    for h in hooks:
        h.remove()
    for bn in bns:
        y = torch.cat(feats[bn])
        torch.testing.assert_close(bn.running_mean.double(), y.mean((0, 2, 3)), rtol=rtol, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), y.var((0, 2, 3)), rtol=rtol, atol=1e-6)


class LongChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.last, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = self.first(x)
        for _ in range(1500):  # far deeper than Python's recursion limit
            x = x * 1.0001
        return self.out(self.last(x))


def test_low_memory_recomputes_long_chains():
    reports = [prune_model(LongChain(), torch.randn(32, 8), PUBLISHED, method="sparsegpt", sparsity=0.5, progress=False,
                           low_memory=low) for low in (False, True)]
    assert all(r.forward_passes == 1 and r.sparsity == 0.5 for r in reports)


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"sparsity": 0.7}, {"nm": "2:4"}])
def test_exact_solver_counts_and_zeros_on_depthwise_and_pointwise_convs(pattern):
    """The exact solver without a refinement (too few samples, or --refine none): removed weights exactly 0 (its
    later updates once gave them rounding noise back), and a depthwise conv's count carried across its 9-weight
    groups (each group once rounded on its own: 4 of 9, 0.44 of the layer)."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                          nn.Conv2d(16, 24, 1), nn.AdaptiveAvgPool2d(1), nn.Conv2d(24, 8, 1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    rep = prune_model(model, x, PUBLISHED, solver="exact", progress=False, **pattern)
    pruned = [r for r in rep.layers if not r.skipped]
    assert len(pruned) == (3 if "sparsity" in pattern else 2)  # 2:4 skips the depthwise conv (1 input per group)
    for r in pruned:
        w = dict(model.named_modules())[r.name].weight
        assert r.solver == "exact" and torch.equal(w == 0, ~r.mask), r.name
        if "sparsity" in pattern:
            assert abs(int((~r.mask).sum()) - pattern["sparsity"] * w.numel()) <= 1, r.name


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
@pytest.mark.parametrize("method", ["sparsegpt", "magnitude", "wanda"])
def test_every_pruned_layer_gets_its_count(name, method):
    """Depthwise and pointwise convs alike, unstructured and 2:4: every pruned layer within one weight of
    the requested count, 2:4 along input channels wherever the layer is not skipped, and the totals."""
    torchvision = pytest.importorskip("torchvision")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for sparsity, nm in ((0.5, None), (0.7, None), (None, "2:4")):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(num_classes=10).eval()
        rep = prune_model(model, x, PUBLISHED, method=method, sparsity=sparsity, nm=nm, batch_size=4, progress=False)
        modules = dict(model.named_modules())
        pruned = [r for r in rep.layers if not r.skipped]
        assert pruned
        for r in pruned:
            w = modules[r.name].weight
            zeros = int((~r.mask).sum())
            assert int((w == 0).sum()) == zeros  # the mask is the whole truth: no kept weight zeroed
            if nm is None:
                assert abs(zeros - sparsity * w.numel()) <= 1, r.name
            else:  # (out, in, kh, kw): every 4 consecutive input channels at a tap keep exactly 2
                kept = r.mask.transpose(1, -1).reshape(*r.mask.transpose(1, -1).shape[:-1], -1, 4).sum(-1)
                assert torch.all(kept == 2), r.name
        for r in rep.layers:
            if r.skipped and nm is not None and "not divisible" in r.reason:
                assert modules[r.name].weight.shape[1] % 4  # skipped only where 2:4 cannot apply
        target = sparsity if nm is None else 0.5
        n_pruned = sum(r.mask.numel() for r in pruned)
        assert abs(rep.sparsity * n_pruned - target * n_pruned) <= len(pruned)
        n_all = sum(m.weight.numel() for m in modules.values() if isinstance(m, (nn.Conv2d, nn.Linear)))
        zeros_all = sum(int((m.weight == 0).sum()) for m in modules.values() if isinstance(m, (nn.Conv2d, nn.Linear)))
        assert rep.total_sparsity == pytest.approx(zeros_all / n_all)
        assert rep.total_sparsity >= rep.sparsity * n_pruned / n_all


@pytest.mark.parametrize("shape", [(8, 6, 5, 5), (8, 6)])
def test_bn_statistics_equal_train_mode_recalibration(shape):
    from cnn_sparsegpt.pruning.batchnorm import bn_statistics_ as _bn_statistics_
    from cnn_sparsegpt.pruning.batchnorm import recalibrate as _recalibrate

    bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1]).eval()
    xs = [torch.randn(*shape, generator=torch.Generator().manual_seed(s)) * 3 + 1 for s in range(3)]
    ref = copy.deepcopy(bn)
    _recalibrate([ref], ref, xs)
    _bn_statistics_(bn, iter(xs))
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 3
    # both are the pooled moments of all the images: mean and unbiased variance over every position, in float64
    # (the offset 1e3 would show a one-pass float32 E[x²] − m² as wrong in the 2nd digit)
    xs = [x + 1e3 for x in xs]
    _bn_statistics_(bn, iter(xs))
    flat = torch.cat(xs).double().transpose(0, 1).reshape(shape[1], -1)
    torch.testing.assert_close(bn.running_mean.double(), flat.mean(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(bn.running_var.double(), flat.var(1), rtol=1e-4, atol=0)


def test_cpu_batches_split_wide_inputs_into_near_equal_views():
    from cnn_sparsegpt.pruning.prune import CPU_BATCH_BYTES, cpu_batches

    batches = [torch.randn(128, 3), torch.randn(5, 3)]
    assert [len(b) for b in cpu_batches(batches, 1024)] == [128, 5]  # small inputs keep their batches
    per_image = CPU_BATCH_BYTES // 32  # at most 32 images per batch
    parts = cpu_batches(batches, per_image)
    assert [len(b) for b in parts] == [32, 32, 32, 32, 5]
    assert parts[1].untyped_storage().data_ptr() == batches[0].untyped_storage().data_ptr()  # views, no copy
    torch.testing.assert_close(torch.cat(parts), torch.cat(batches), rtol=0, atol=0)
    assert [len(b) for b in cpu_batches([torch.randn(3, 3)], CPU_BATCH_BYTES * 2)] == [1, 1, 1]  # at least one image


@pytest.mark.parametrize("conv, size", [
    (dict(in_channels=6, out_channels=8, kernel_size=3, padding=1), 12),  # shifted correlations
    (dict(in_channels=6, out_channels=8, kernel_size=3, padding=1), 4),  # shifted, by cells
    (dict(in_channels=6, out_channels=8, kernel_size=3, stride=2, padding=1, bias=True), 12),  # columns
    (dict(in_channels=6, out_channels=8, kernel_size=1), 12),  # pointwise
    (dict(in_channels=6, out_channels=9, kernel_size=3, groups=3, padding="same", padding_mode="reflect"), 12),
])
def test_output_moments_match_the_outputs_statistics(conv, size):
    """The mean and variance of a conv's output, from ΣXXᵀ and the column sums, as float64 statistics of the outputs
    on every path H takes (inputs offset by 3: outputs whose means are not small against their spread)."""
    from cnn_sparsegpt.pruning.layer import LayerPruner

    layer = nn.Conv2d(**conv)
    p = LayerPruner(layer, "conv", track_mean=True, keep_sums=True)
    xs = [torch.randn(4, 6, size, size, generator=torch.Generator().manual_seed(s)) + 3 for s in range(3)]
    with torch.no_grad():
        for x in xs:
            p.add_batch(x)
    assert p.shifted(xs[0]) == (conv["kernel_size"] == 3 and conv.get("stride", 1) == 1 and "groups" not in conv)
    with torch.no_grad():
        p.H  # the solve reads H; the sums are kept past it
        y = torch.cat([layer(x) for x in xs]).double()
    mean, var = p.output_moments()
    torch.testing.assert_close(mean, y.mean((0, 2, 3)), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(var, y.var((0, 2, 3), correction=0), rtol=1e-5, atol=1e-9)
    assert p.batches == 3


def test_batchnorms_after_pruned_convs_come_from_their_sums(monkeypatch):
    """SparseGPT prunes: a BatchNorm that reads a pruned conv gets its statistics from the conv's sums, with no pass
    over its input (no barrier); the others (after the dense stem) from their inputs. Both are the pooled moments
    of the pruned network's activations."""
    from cnn_sparsegpt.pruning import prune as prune_module

    read = []
    real = prune_module.bn_statistics_
    monkeypatch.setattr(prune_module, "bn_statistics_", lambda bn, inputs, group=None: (
        read.append(bn), real(bn, inputs, group)))
    model, x = make(), calib()
    prune_model(model, x, PUBLISHED, method="sparsegpt", nm="2:4", batch_size=16, progress=False)
    assert read == [model.bn]  # the stem is not pruned by default
    bns = [model.bn, model.block.bn1, model.block.bn2, model.block.down[1]]
    assert_statistics_of_a_pass(model, x, 16, bns, rtol=1e-5)
    assert all(int(bn.num_batches_tracked) == 4 for bn in bns)


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("shape, kernel", [((6, 8, 12, 12), 3), ((6, 8, 12, 12), 1), ((6, 8, 9, 9), 2)])
def test_parts_of_a_batch_add_one_float64_term(shape, kernel, gather, monkeypatch):
    """A calibration batch split into parts (end=False but for the last) leaves S untouched until its last part, then
    adds what the whole batch adds up to float32 rounding: shifted, pointwise and columns paths, with the cross term;
    small parts gathered into one product (gather), or each summed on its own into float32 sums kept open."""
    from cnn_sparsegpt.pruning import layer as layer_module
    from cnn_sparsegpt.pruning.layer import LayerPruner

    if not gather:
        monkeypatch.setattr(layer_module, "GATHER_BYTES", 0)

    layer = nn.Conv2d(shape[1], 4, kernel, stride=2 if kernel == 2 else 1, padding=kernel // 2)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    d = x + 0.1 * torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    whole, split = (LayerPruner(layer, "c", dense_target=True, track_mean=True) for _ in range(2))
    whole.add_batch(x, d)
    parts = list(zip(x.tensor_split(3), d.tensor_split(3)))
    for i, (xp, dp) in enumerate(parts):
        split.add_batch(xp, dp, end=i == len(parts) - 1)
        if i < len(parts) - 1:
            assert not split.S.any()  # still in float32
    assert split.nsamples == whole.nsamples and split.batches == 3
    torch.testing.assert_close(split.H, whole.H, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split.R, whole.R, rtol=1e-4, atol=1e-6)


def test_part_ends_mark_the_last_part_of_each_batch():
    from cnn_sparsegpt.pruning.prune import cpu_batches, part_ends

    batches = [torch.zeros(10, 3), torch.zeros(4, 3), torch.zeros(7, 3)]
    parts = cpu_batches(batches, 2**27)  # 1 image per part at 128 MB per image
    assert part_ends(batches, parts) == {9, 13, 20}
    assert part_ends(batches, batches) == {0, 1, 2}


def test_gathered_parts_with_and_without_a_cross_term():
    """Parts gathered into one product where only some inputs changed (the others' cross term is an exact 0): the
    same H and R as the whole batch."""
    from cnn_sparsegpt.pruning.layer import LayerPruner

    layer = nn.Conv2d(8, 4, 1)
    x = torch.randn(6, 8, 10, 10, generator=torch.Generator().manual_seed(0))
    d = x + 0.1 * torch.randn(6, 8, 10, 10, generator=torch.Generator().manual_seed(1))
    d[:2] = x[:2]  # the first part's inputs are unchanged
    whole, split = (LayerPruner(layer, "c", dense_target=True) for _ in range(2))
    whole.add_batch(x, d)
    for i, (xp, dp) in enumerate(zip(x.tensor_split(3), d.tensor_split(3))):
        split.add_batch(xp, dp, end=i == 2)
    torch.testing.assert_close(split.H, whole.H, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split.R, whole.R, rtol=1e-4, atol=1e-6)


def test_each_modules_own_mode_comes_back():
    """A model training with its BatchNorms frozen (eval) leaves prune_model as it came (model.train(flag) after the
    prune would have set them all to training)."""
    from cnn_sparsegpt import create_model

    model = create_model("resnet20_cifar").train()
    model.bn1.eval()
    prune_model(model, torch.randn(16, 3, 32, 32), nm="2:4", progress=False)
    assert model.training and model.layer1[0].bn1.training and not model.bn1.training


def test_a_weight_the_model_froze_is_a_fixed_operation_and_stays():
    """A conv whose weight the model's code froze while the rest trains (an Ultralytics YOLO head's DFL integral,
    weights 0..15) is left as it is, with the reason; a model frozen whole for inference is pruned as usual."""
    from cnn_sparsegpt.pruning.graph import FROZEN

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 1),
                              nn.Conv2d(16, 8, 1), nn.Flatten(), nn.LazyLinear(4))
        model(torch.randn(1, 3, 8, 8))
        model[4].weight.data = torch.arange(256.0).reshape(16, 16, 1, 1)
        model[4].weight.requires_grad_(False)
        return model

    model, x = build(), torch.randn(32, 3, 8, 8)
    fixed = model[4].weight.clone()
    report = prune_model(model, x, nm="2:4", progress=False)
    layer = next(r for r in report.layers if r.name == "4")
    assert layer.skipped and layer.reason == FROZEN and torch.equal(model[4].weight, fixed)
    assert not next(r for r in report.layers if r.name == "2").skipped
    whole = build().requires_grad_(False)
    report = prune_model(whole, x, nm="2:4", progress=False)
    assert not next(r for r in report.layers if r.name == "4").skipped


class _Head(nn.Module):
    """A part fx cannot trace (Python control flow on a tensor's values), with layers of its own."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = self.a(x)
        if float(y.abs().mean()) >= 0:
            y = torch.relu(y)
        return self.b(y)


class _PartlyTraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.split = nn.Conv2d(32, 32, 1)
        self.head = _Head()

    def forward(self, x, *args, **kwargs):  # (as an Ultralytics model's)
        y = list(self.split(self.body(self.stem(x))).chunk(2, 1))  # (Ultralytics' C2f)
        return self.head(y[0] + y[1])


@pytest.mark.parametrize("low_memory", [False, True])  # the part's inputs stored, or one forward per layer in it
def test_a_model_fx_traces_but_in_part_is_pruned_in_one_pass_and_its_part_layer_by_layer(low_memory):
    """The graph calls the part fx cannot trace as a whole; its layers get one forward each, the others one pass:
    the same prune as one forward per layer (without what only the graph gives: BatchNorm statistics re-estimated
    between layers, BatchNorm intercepts)."""
    torch.manual_seed(0)
    model, x = _PartlyTraceable().eval(), torch.randn(32, 3, 8, 8)
    options = dict(nm="2:4", progress=False, bn_recalibration=False, intercept=False, low_memory=low_memory)
    per_layer = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune_model(model, x, **options)
    assert any("cannot trace head of _PartlyTraceable" in str(w.message) for w in caught)
    reference = prune_model(per_layer, x, use_fx=False, **options)
    assert report.forward_passes < reference.forward_passes and (low_memory or report.forward_passes <= 2)
    assert set(report.masks) == set(reference.masks) == {"body.0.weight", "body.3.weight", "split.weight",
                                                         "head.a.weight", "head.b.weight"}
    for name, mask in reference.masks.items():
        assert torch.equal(report.masks[name], mask)
    for (name, w), w_ref in zip(model.state_dict().items(), per_layer.state_dict().values()):
        torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6, msg=name)


def test_a_part_whose_stored_inputs_would_not_fit_is_pruned_one_forward_per_layer(monkeypatch):
    """A part's stored inputs are an activation of the whole calibration set per network: under memory_policy's
    rule (half of the free memory) they are stored, else each layer inside the part gets a forward pass of its own,
    the same prune either way; the report's memory policy says which."""
    from cnn_sparsegpt.pruning import graph
    torch.manual_seed(0)
    model, x = _PartlyTraceable().eval(), torch.randn(32, 3, 8, 8)
    head_input = 16 * 8 * 8 * 4 * 32  # bytes: the head's input for the 32 images
    kept, why = graph.stored_parts(model, ["head"], x[:1], 32, x.device, copies=2, free=8 * head_input)
    assert kept == ["head"] and "head's inputs stored (4 activations" in why
    kept, why = graph.stored_parts(model, ["head"], x[:1], 32, x.device, copies=2, free=4 * head_input)
    assert kept == [] and "not stored, one forward per layer in it" in why
    spare = _PartlyTraceable().eval()
    spare.spare = nn.Conv2d(3, 3, 1)  # a part the forward never calls: nothing to store
    assert graph.stored_parts(spare, ["spare", "head"], x[:1], 32, x.device, free=1 << 40)[0] == ["head"]
    options = dict(nm="2:4", progress=False, bn_recalibration=False, intercept=False)
    per_layer = copy.deepcopy(model)
    stored = prune_model(copy.deepcopy(model), x, **options)
    free = iter([1 << 40])  # the whole network's policy: plenty; the part's: nothing
    monkeypatch.setattr(graph, "available_memory", lambda device: next(free, 0))
    report = prune_model(model, x, **options)
    assert "default (" in report.memory_policy and "head's inputs not stored" in report.memory_policy
    assert report.forward_passes == stored.forward_passes + 1  # head.a and head.b: one pass each, not one stored
    for name, mask in prune_model(per_layer, x, use_fx=False, **options).masks.items():
        assert torch.equal(report.masks[name], mask)


def test_output_measures_of_a_partly_traced_model_run_its_graph_and_equal_whole_runs(monkeypatch):
    """A change to a layer inside a part called whole starts at the part's node (graph._reads)."""
    import contextlib
    from cnn_sparsegpt.pruning import output_kl
    model, x = _PartlyTraceable().eval(), torch.randn(16, 3, 8, 8)
    modules = dict(model.named_modules())

    @contextlib.contextmanager
    def zeroed(name):
        w = modules[name].weight.data.clone()
        modules[name].weight.data.zero_()
        yield
        modules[name].weight.data.copy_(w)

    changes = {n: [n] for n in ("body.0", "split", "head.a", "head.b")}
    stem_calls = []
    handle = model.stem.register_forward_hook(lambda *_: stem_calls.append(1))
    on_graph = output_kl.output_kls(model, x, changes, zeroed, outputs="values")
    handle.remove()
    assert len(stem_calls) == 5  # partial_trace's chained_parts and check (graph, model), the dense outputs, the
    # unchanged prefix of every change (no change re-ran it)
    monkeypatch.setattr(output_kl, "partial_trace", lambda *a: None)
    whole = output_kl.output_kls(model, x, changes, zeroed, outputs="values")
    assert set(on_graph) == set(changes) and all(whole[k] > 0 for k in changes)
    for k in changes:
        torch.testing.assert_close(on_graph[k], whole[k], rtol=1e-5, atol=0)


def test_layer_patterns_give_layers_their_own_pattern():
    """layer_patterns: the first entry that matches a layer is its pattern (N:M or a sparsity), resolved as if the
    whole prune had it (the swap at N:M); the other layers take the main pattern; an entry that matches no layer, or
    only layers kept dense, is a warning; a bad entry, or no main pattern, is one line."""
    with pytest.warns(RuntimeWarning, match="'nothing' matches no Conv or Linear layer"):
        rep = prune_model(make(), calib(), sparsity=0.5, allocation="uniform", progress=False,
                          layer_patterns={"block\\.conv2": "2:4", "block\\..*": 0.75, "nothing": 0.1})
    by = {r.name: r for r in rep.layers}
    assert (by["block.conv2"].pattern, by["block.conv2"].refine) == ("2:4", "swap")
    assert (by["block.conv2"].mask.reshape(16, 4, 4, 9).sum(2) == 2).all()  # 2 of each 4 input channels per tap
    assert by["block.conv1"].pattern == by["block.down.0"].pattern == "0.75"
    assert abs(by["block.conv1"].sparsity - 0.75) < 0.01 and abs(by["fc1"].sparsity - 0.5) < 0.01
    assert (by["fc1"].pattern, by["fc1"].refine) == ("0.5", "cg")
    assert rep.config.layer_patterns == {"block\\.conv2": "2:4", "block\\..*": "0.75", "nothing": "0.1"}
    with pytest.warns(RuntimeWarning, match="stem stays dense"):
        prune_model(make(), calib(), sparsity=0.5, layer_patterns={"stem": 0.5}, progress=False)
    for bad, match in (({"x": "3:2"}, "'x' has pattern '3:2'"), ({"(": 0.5}, "not a layer name or regular"),
                       ({"x": 1.0}, "sparsity in \\[0, 1\\)")):
        with pytest.raises(UserError, match=match):
            prune_model(make(), calib(), sparsity=0.5, layer_patterns=bad, progress=False)
    with pytest.raises(UserError, match="give sparsity or nm too"):
        prune_model(make(), calib(), layer_patterns={"fc1": 0.5}, progress=False)


def test_ignored_layers_keep_their_channels_and_weights_in_a_channel_prune():
    """ignore with structure='channels': an ignored layer's input and output channels stay, and its weights (the
    channel prune once went through the list as if it were not there)."""
    model = make()
    dense = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="'nothing' matches no Conv or Linear layer"):
        rep = prune_model(model, calib(), structure="channels", keep_params=0.85, round_to=2,
                          ignore=["block.conv2", "nothing"], progress=False)
    assert rep.structure["params"][1] < rep.structure["params"][0]  # something went: the stem's channels
    assert model.stem.out_channels < 8 and torch.equal(model.block.conv2.weight, dense.block.conv2.weight)


def test_an_option_the_prune_never_reads_is_a_warning():
    """owl_lambda without the owl allocation (and the like) changes nothing: one warning naming what it needs; the
    presets' own values pass quietly."""
    with pytest.warns(RuntimeWarning, match="owl_lambda=0.2 \\(needs allocation 'owl'\\): changes nothing"):
        prune_model(make(), calib(), sparsity=0.5, allocation="uniform", owl_lambda=0.2, progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*changes? nothing in this prune")
        prune_model(make(), calib(), PUBLISHED, sparsity=0.5, progress=False)
        prune_model(make(), calib(), sparsity=0.5, allocation="owl", owl_lambda=0.2, progress=False)


def test_nm_share_keeps_the_layers_whose_pattern_costs_most_dense():
    """nm_share: the N:M pattern on at least that share of the pruned layers' weights, the layers left dense the
    cheapest set at the output (the knapsack against every subset here), each saying why; nm is required."""
    import itertools
    import math

    from cnn_sparsegpt.pruning.allocation import UNITS

    rep = prune_model(make(), calib(), nm="2:4", nm_share=0.6, progress=False)
    share = rep.allocation["nm_share"]
    by = {r.name: r for r in rep.layers}
    names = list(share["cost"])
    assert set(names) == {"block.conv1", "block.conv2", "block.down.0", "fc1"} and share["dense"]
    size = {n: math.prod(by[n].shape) for n in names}
    units = {n: round(size[n] / sum(size.values()) * UNITS) for n in names}
    best = min(sum(share["cost"][n] for n in names if n not in kept) for k in range(len(names) + 1)
               for kept in itertools.combinations(names, k)
               if sum(units[n] for n in names if n not in kept) >= 0.6 * UNITS)
    assert sum(share["cost"][n] for n in names if n not in share["dense"]) == pytest.approx(best)
    covered = sum(size[n] for n in names if n not in share["dense"]) / sum(size.values())
    assert share["covered"] == pytest.approx(covered)
    for n in names:
        if n in share["dense"]:
            assert by[n].skipped and "nm_share" in by[n].reason
        else:
            assert by[n].pattern == "2:4" and by[n].sparsity == 0.5
    with pytest.raises(UserError, match="give nm"):
        prune_model(make(), calib(), sparsity=0.5, nm_share=0.5, progress=False)


class _Checked(nn.Module):  # a part whose own code fx cannot trace: a check on its input's shape, then its children
    def __init__(self, residual=False):
        super().__init__()
        self.conv, self.bn, self.residual = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), residual

    def forward(self, x):
        if x.shape[1] != 8:
            raise ValueError("8 channels")
        y = self.bn(self.conv(x))
        return x + y if self.residual else y


class _WithChecked(nn.Module):
    def __init__(self, residual=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.part = _Checked(residual)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.part(self.stem(x)))


@pytest.mark.parametrize("residual", [False, True])
def test_a_part_that_only_checks_then_runs_its_children_is_traced_through(residual):
    """A part fx cannot trace (a check on its input's shape, as a Hugging Face ResNet's stem) that runs its children
    one after another is traced as that chain (graph.chained_parts): its layers are on the graph and its channels
    prunable; one that does more with them (a residual sum) stays a part called whole."""
    from cnn_sparsegpt import channel_plan
    from cnn_sparsegpt.pruning.graph import chained_parts, partial_trace

    torch.manual_seed(0)
    model, x = _WithChecked(residual).eval(), torch.randn(4, 3, 8, 8)
    assert ("part" in chained_parts(model, x, ["part"])) == (not residual)
    gm = partial_trace(model, x)
    assert gm.opaque_modules == (["part"] if residual else [])
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    stem = next(g for g in channel_plan(model, x[:1]) if "stem" in g["producers"])
    assert (stem["removable"] > 0) == (not residual)
