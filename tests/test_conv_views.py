"""Conv1d and transposed convs pruned through the Conv2d they equal (pruning/conv_views.py): the view computes the
original layer exactly, the prune's error and masks are the original layer's, and the model comes back whole."""
import copy

import pytest
import torch
from torch import nn

from cnn_sparsegpt import PUBLISHED, UserError, prune_model
from cnn_sparsegpt.pruning.conv_views import conv2d_views, view_for

LAYERS = {  # name → (layer, input shape, view kind)
    "conv1d": (lambda: nn.Conv1d(8, 12, 5, stride=2, padding=2), (4, 8, 37), "conv"),
    "conv1d_grouped_dilated_same": (lambda: nn.Conv1d(8, 12, 3, padding="same", dilation=2, groups=4,
                                                      padding_mode="reflect"), (4, 8, 37), "conv"),
    "conv1d_unbatched": (lambda: nn.Conv1d(8, 12, 3), (8, 20), "conv"),
    "transposed_2x2_stride2": (lambda: nn.ConvTranspose2d(8, 6, 2, stride=2), (4, 8, 5, 7), "pixels"),
    "transposed_grouped_2x2": (lambda: nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), (4, 8, 5, 7), "pixels"),
    "transposed_4x4_stride2_pad1": (lambda: nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1), (4, 8, 5, 7), "zeros"),
    "transposed_everything": (lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2,
                                                         dilation=2), (4, 8, 5, 7), "zeros"),
    "transposed_rectangular_cropped": (lambda: nn.ConvTranspose2d(8, 6, (3, 5), stride=(2, 3), padding=(4, 0)),
                                       (4, 8, 5, 7), "zeros"),
    "transposed1d": (lambda: nn.ConvTranspose1d(8, 6, 4, stride=2, padding=1), (4, 8, 9), "zeros"),
    "conv3d": (lambda: nn.Conv3d(8, 12, 3, padding=1), (2, 8, 5, 6, 7), "depth"),
    "conv3d_grouped_strided_dilated": (lambda: nn.Conv3d(8, 12, (3, 3, 1), stride=(2, 1, 2), padding=(2, 1, 0),
                                                         dilation=(2, 1, 1), groups=4), (2, 8, 9, 6, 7), "depth"),
    "conv3d_same_reflect": (lambda: nn.Conv3d(8, 12, (2, 3, 3), padding="same", padding_mode="reflect"),
                            (2, 8, 5, 6, 7), "depth"),
    "conv3d_pointwise": (lambda: nn.Conv3d(8, 12, 1), (2, 8, 5, 6, 7), "depth"),
    "transposed3d_2x2x2": (lambda: nn.ConvTranspose3d(8, 6, 2, stride=2), (2, 8, 3, 4, 5), "voxels"),
    "transposed3d_grouped_anisotropic": (lambda: nn.ConvTranspose3d(8, 6, (1, 2, 3), stride=(1, 2, 3), groups=2),
                                         (2, 8, 3, 4, 5), "voxels"),
}


@pytest.mark.parametrize("name", LAYERS)
def test_view_computes_the_layer_and_its_weight_layout_round_trips(name):
    make, shape, kind = LAYERS[name]
    torch.manual_seed(0)
    layer = make()
    view, x = view_for(layer), torch.randn(shape)
    assert view.kind == kind
    with torch.no_grad():
        assert torch.allclose(view(x), layer(x), atol=1e-5, rtol=1e-5)
    w = layer.weight.detach()
    assert torch.equal(view.to_original(view.to_view(w)), w)


@pytest.mark.parametrize("name", LAYERS)
def test_reported_error_is_the_original_layers_output_error(name):
    """SparseGPT's error tr(ΔW·H·ΔWᵀ)/tr(W·H·Wᵀ) on the view's Hessian equals the relative output error of the
    original layer run on the same inputs: the view's inputs, weight and Hessian are the layer's."""
    make, shape, _ = LAYERS[name]
    torch.manual_seed(0)
    layer = make()
    layer.bias = None  # (the error is of W·X)
    dense = nn.Sequential(layer)
    x = torch.randn(64, *(shape if "unbatched" in name else shape[1:]))
    with torch.no_grad():
        y = layer(x)
    rep = prune_model(dense, x, PUBLISHED, sparsity=0.5, prune_all=True, progress=False)
    (r,) = rep.layers
    with torch.no_grad():
        measured = ((layer(x) - y).square().sum() / y.square().sum()).item()
    assert type(dense[0]) is type(make()) and r.name == "0" and r.shape == list(layer.weight.shape)
    assert r.mask.shape == layer.weight.shape and torch.all(layer.weight[~r.mask] == 0)
    assert r.sparsity == 0.5 and r.error == pytest.approx(measured, rel=1e-3)


def unet():
    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.enc2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
            self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
            self.up2 = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1, bias=False)
            self.dec = nn.Sequential(nn.Conv2d(48, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                     nn.Conv2d(16, 4, 1))

        def forward(self, x):
            a = self.enc1(x)
            b = self.enc2(a)
            return self.dec(torch.cat([a, self.up(b), self.up2(b)], 1))
    return UNet().eval(), torch.randn(64, 3, 16, 16)


def audio():
    return nn.Sequential(nn.Conv1d(1, 32, 9, stride=4, padding=4), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Conv1d(32, 64, 5, padding=2), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Conv1d(64, 64, 5, padding=2, groups=4), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.ConvTranspose1d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 10)).eval(), torch.randn(64, 1, 400)


def volume_unet():
    """A 3-D UNet in small (nnU-Net's shape): strided Conv3d down, a ConvTranspose3d whose kernel is its stride up,
    joined to the encoder's features."""
    class UNet3d(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU())
            self.down = nn.Sequential(nn.Conv3d(8, 16, 3, stride=2, padding=1), nn.BatchNorm3d(16), nn.ReLU())
            self.up = nn.ConvTranspose3d(16, 8, 2, stride=2)
            self.dec = nn.Sequential(nn.Conv3d(16, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), nn.Conv3d(8, 3, 1))

        def forward(self, x):
            a = self.enc(x)
            return self.dec(torch.cat([a, self.up(self.down(a))], 1))
    model, x = UNet3d(), torch.randn(16, 1, 6, 8, 8)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.momentum = None  # the statistics of its inputs (as video() does)
    with torch.no_grad():
        model.train()(x)
    return model.eval(), x


def video():
    model = nn.Sequential(nn.Conv3d(3, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(),
                          nn.Conv3d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm3d(32), nn.ReLU(),
                          nn.Conv3d(32, 32, (1, 3, 3), padding=(0, 1, 1), groups=2), nn.BatchNorm3d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 5))
    x = torch.randn(32, 3, 4, 8, 8)
    for bn in model[1::3]:  # BatchNorm statistics of its inputs: the default ones would make re-estimating them
        bn.momentum = None  # alone change the outputs more than pruning does
    with torch.no_grad():
        model.train()(x)
    return model.eval(), x


@pytest.mark.parametrize("build", [unet, audio, video, volume_unet])
@pytest.mark.parametrize("pattern", [{"nm": "2:4"}, {"sparsity": 0.6}])
def test_default_recipe_prunes_them_in_their_own_layout(build, pattern):
    torch.manual_seed(0)
    model, x = build()
    types = [type(m) for m in model.modules()]
    with torch.no_grad():
        y = model(x)
    rep = prune_model(model, x, progress=False, **pattern)
    assert [type(m) for m in model.modules()] == types  # the original modules are back
    modules = dict(model.named_modules())
    viewed = {n for n, m in modules.items()
              if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Conv3d, nn.ConvTranspose3d))}
    pruned = {r.name for r in rep.layers if not r.skipped}
    assert viewed - pruned == {"0", "enc.0"} & viewed  # every one but a first conv kept dense by convention
    for key, mask in rep.masks.items():
        m = modules[key.removesuffix(".weight")]
        assert mask.shape == m.weight.shape and torch.all(m.weight[~mask] == 0)
        if "nm" in pattern:  # 2 of every 4 along the original's input channels (a transposed conv's dim 0)
            along = 0 if isinstance(m, nn.modules.conv._ConvTransposeNd) else 1
            groups = mask.movedim(along, -1)
            assert torch.all(groups.reshape(*groups.shape[:-1], -1, 4).sum(-1) == 2), key
    assert rep.sparsity == pytest.approx(0.5 if "nm" in pattern else 0.6, abs=0.01)
    with torch.no_grad():
        assert ((model(x) - y).norm() / y.norm()).item() < 0.5


def test_ignore_names_the_original_layer_and_fx_equals_hooks():
    runs = []
    for use_fx in (True, False):
        torch.manual_seed(0)
        model, x = unet()
        rep = prune_model(model, x, nm="2:4", ignore=["up2"], use_fx=use_fx, permute=False, bn_recalibration=False,
                          progress=False)
        by = {r.name: r for r in rep.layers}
        assert by["up2"].skipped and by["up2"].reason == "in the ignore list" and not by["up"].skipped
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*runs))
    torch.manual_seed(0)
    model, x = unet()  # a channel prune keeps an ignored transposed conv's channels (named as the user's layer)
    rep = prune_model(model, x, structure="channels", keep_macs=0.7, round_to=1, ignore=["up"], progress=False)
    assert (model.up.in_channels, model.up.out_channels) == (32, 16)
    assert any("read by up: in the ignore list" in g["fixed"] for g in rep.structure["groups"])


def test_model_comes_back_whole_when_the_prune_fails(monkeypatch):
    import cnn_sparsegpt.pruning.prune as prune_module
    torch.manual_seed(0)
    model, x = unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def fails(model, *args, **kwargs):  # inside the views: the transposed conv is a Conv2d now
        assert not isinstance(model.up, nn.ConvTranspose2d)
        raise RuntimeError("a failure in the middle of the prune")
    monkeypatch.setattr(prune_module, "_prune_weights", fails)
    with pytest.raises(RuntimeError, match="middle of the prune"):
        prune_model(model, x, sparsity=0.5, progress=False)
    assert isinstance(model.up, nn.ConvTranspose2d) and model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_views_leave_weights_bit_identical_when_nothing_is_pruned():
    torch.manual_seed(0)
    model, _ = audio()
    before = [p.detach().clone() for p in model.parameters()]
    with conv2d_views(model) as views:
        assert set(views) == {"0.conv", "3.conv", "6.conv", "9.conv"}
        assert not any(isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)) for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("build", [unet, audio, video, volume_unet])
def test_export_counts_and_checks_them(build, tmp_path):
    pytest.importorskip("onnxruntime")
    from cnn_sparsegpt import export_model
    torch.manual_seed(0)
    model, x = build()
    rep = prune_model(model, x, nm="2:4", progress=False)
    out = export_model(model, list(x.shape[1:]), onnx=tmp_path / "m.onnx", compressed=tmp_path / "m.safetensors",
                       masks=rep.masks, progress=False)
    assert out["onnx_max_abs_diff"] < 1e-4
    rows = {r["name"]: r for r in out["layers"]}
    for key in rep.masks:
        name = key.removesuffix(".weight")
        assert rows[name]["two_four"] and rows[name]["sparsity"] == 0.5
    if build is unet:  # a transposed conv's multiply-adds: every weight once per input pixel (8x8 here)
        assert rows["up"]["macs"] == 32 * 16 * 2 * 2 * 8 * 8 and rows["up2"]["macs"] == 32 * 16 * 4 * 4 * 8 * 8
    elif build is audio:
        assert rows["3"]["macs"] == 64 * 32 * 5 * 100
    elif build is video:  # 32 outputs of 16 inputs, 3x3x3 taps, at 2x4x4 positions
        assert rows["3"]["macs"] == 32 * 16 * 27 * 2 * 4 * 4
    else:  # the 3-D transposed conv: every weight once per input voxel (3x4x4)
        assert rows["up"]["macs"] == 16 * 8 * 8 * 3 * 4 * 4


def _one_d():
    return nn.Sequential(nn.Conv1d(4, 32, 9, stride=2, padding=4), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Conv1d(32, 64, 5, padding=2, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Conv1d(64, 64, 3, padding=1, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(64, 10))


def _two_d_twin(model):
    """The same network written with Conv2d of height 1 (inputs (N, C, 1, L))."""
    twin = nn.Sequential(nn.Conv2d(4, 32, (1, 9), stride=(1, 2), padding=(0, 4)), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, (1, 5), padding=(0, 2), bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, (1, 3), padding=(0, 1), bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    twin.load_state_dict({k: v.unsqueeze(2) if v.ndim == 3 else v for k, v in model.state_dict().items()})
    return twin.eval()


@pytest.mark.parametrize("options", [{"nm": "2:4"}, {"sparsity": 0.6}, {"structure": "channels", "keep_macs": 0.5}])
def test_a_1d_cnn_prunes_as_its_2d_twin(options):
    """Every step of the default recipe (permutation, intercept into the BatchNorm, channel groups) treats a Conv1d
    network as the Conv2d network of height 1 it equals: the same masks, kept channels and outputs (up to the
    rounding of BatchNorm statistics measured on 3-D instead of 4-D tensors)."""
    torch.manual_seed(0)
    model = _one_d().train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for _ in range(5):
            model(torch.randn(32, 4, 128) * 2 + 0.3)
    model.eval()
    twin, x = _two_d_twin(model), torch.randn(256, 4, 128)
    rep = prune_model(model, x, progress=False, **options)
    rep_twin = prune_model(twin, x.unsqueeze(2), progress=False, **options)
    assert [r.shape for r in rep.layers] == [r.shape[:2] + r.shape[3:] if len(r.shape) == 4 else r.shape
                                             for r in rep_twin.layers]
    for (key, mask), (key_twin, mask_twin) in zip(rep.masks.items(), rep_twin.masks.items()):
        assert key == key_twin and (mask == mask_twin.squeeze(2)).float().mean() > 0.99
    with torch.no_grad():
        y, y_twin = model(x), twin(x.unsqueeze(2))
    assert ((y - y_twin).norm() / y_twin.norm()).item() < 1e-4


@pytest.mark.parametrize("build", [unet, audio, video, volume_unet])
def test_channel_prune_through_them_and_back_into_a_fresh_model(build):
    """Whole channels go through a Conv1d, a Conv3d (each channel its kd view inputs) and a transposed conv (its
    input channels, and its output channels: a pixel-shuffled view's stride² rows and bias entry each, counted as one
    channel of the layer; a ConvTranspose3d's stay, named); the run's spec rebuilds the smaller model from a fresh one
    (`export`, `finetune`)."""
    from cnn_sparsegpt.pruning.slicing import apply_structure
    torch.manual_seed(0)
    model, x = build()
    fresh = copy.deepcopy(model)
    rep = prune_model(model, x, structure="channels", keep_macs=0.6, round_to=1, progress=False)
    dense_macs, kept_macs = rep.structure["macs"]
    assert kept_macs <= 0.6 * dense_macs
    modules = dict(model.named_modules())
    for r in rep.layers:
        assert r.shape == list(modules[r.name].weight.shape)
    changed = {r.name for r in rep.layers if r.reason.startswith("channels:")}
    if build is unet:
        assert {"enc2.1", "up", "up2"} <= changed  # enc2's channels: read by both transposed convs
        up = next(g for g in rep.structure["groups"] if g["producers"] == ["up"])
        assert up["channels"] == 16 and up["per_unit"] == 1 and not up["fixed"]
        assert model.up.out_channels == up["kept"] < 16 and model.up.bias.shape == (up["kept"],)
    elif build is audio:
        assert {"0", "3", "6", "9"} <= changed
    elif build is video:
        assert {"0", "3", "6"} <= changed
    else:  # the 3-D transposed conv's inputs and outputs stay (named); the convs around it lose channels
        assert {"enc.0", "dec.0"} <= changed and "up" not in changed
        assert any(g["fixed"] == "at up, a ConvTranspose3d, whose channels structured pruning does not follow"
                   for g in rep.structure["groups"])
    rebuilt = apply_structure(fresh, rep.structure["spec"])
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_nm_groups_of_a_3d_conv_stay_within_one_tap():
    """A Conv3d's view reads kd taps of C channels as kd·C inputs: with C not divisible by M its N:M groups would
    straddle two taps, so the layer stays dense (as a Conv2d with C inputs would), naming C."""
    model = nn.Sequential(nn.Conv3d(3, 8, 3), nn.ReLU(), nn.Conv3d(8, 6, (2, 1, 1)), nn.ReLU(),
                          nn.Conv3d(6, 8, (2, 1, 1)))
    rep = prune_model(model, torch.randn(8, 3, 6, 6, 6), nm="2:4", progress=False)
    by = {r.name: r for r in rep.layers}
    assert not by["2"].skipped and by["4"].skipped
    assert by["4"].reason == "6 input channels per group not divisible by M=4"
