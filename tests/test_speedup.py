"""target_speedup: the layer latency table (interpolation, call overhead, cache) and the search that corrects the
predicted target by the measured one. Timing is replaced by a deterministic cost model (seconds = multiply-adds
per call, a fixed per-call cost): no test here depends on how fast this machine is."""
import json
import warnings

import pytest
import torch
from torch import nn

from cnn_sparsegpt import UserError, prune_model
from cnn_sparsegpt.deploy import layer_latency
from cnn_sparsegpt.deploy.layer_latency import LayerLatency
from cnn_sparsegpt.pruning import speedup

from .test_prune_model import TinyResNet, calib, make

CALL = 1e-5  # seconds a call costs on the fake runtime whatever it computes
PER_MAC = 1e-9


class FakeRuntime:
    """Seconds per call from the model's multiply-adds (Conv2d/Linear) on the example's shape."""
    calls = 0

    def __init__(self, model, example, threads):
        macs = 0

        def count(m, args, out):
            nonlocal macs
            w = m.weight
            macs += w.numel() * (out[0].numel() // w.shape[0])  # per output position, channels first or last

        hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            model(example[:1])
        for h in hooks:
            h.remove()
        self.seconds = CALL + PER_MAC * macs
        FakeRuntime.calls += 1

    def __call__(self, x):
        pass


@pytest.fixture
def fake_runtime(monkeypatch, tmp_path):
    monkeypatch.setenv("CNN_SPARSEGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(layer_latency, "runtime_class", lambda name: FakeRuntime)
    monkeypatch.setattr(layer_latency, "time_calls", lambda fn, x, warmup, runs: [fn.seconds] * runs)
    monkeypatch.setattr(speedup, "runtime_class", lambda name: FakeRuntime)
    monkeypatch.setattr(speedup, "side_by_side", lambda models, x, **kw: (None, {k: m.seconds for k, m in
                                                                                models.items()}))
    FakeRuntime.calls = 0
    return tmp_path / "cache" / "layer_latency.json"


def test_layer_latency_interpolates_between_widths():
    t = LayerLatency([0.25, 0.5, 1.0], [1.0, 2.0, 4.0])
    assert t.at(0.1) == 1.0 and t.at(0.5) == 2.0 and t.at(0.75) == pytest.approx(3.0) and t.at(1.0) == 4.0


def test_table_takes_off_the_call_cost_and_is_cached(fake_runtime):
    model = make(TinyResNet)
    varying = {"block.conv1": {"out"}, "fc1": {"in"}}
    table = layer_latency.layer_latency_table(model, calib(2), varying, "onnxruntime", 1)
    conv = model.block.conv1
    dense_macs = conv.weight.numel() * 4 * 4  # 8x8 inputs, stride 2
    assert set(table) == {"block.conv1", "fc1"}
    # the call cost, measured on a 1x1 conv of one pixel (1 multiply-add), is taken off
    assert table["block.conv1"].at(1.0) == pytest.approx(PER_MAC * (dense_macs - 1), rel=1e-6)
    assert table["block.conv1"].macs_fractions[-1] == 1.0 and len(table["block.conv1"].seconds) == 8
    assert fake_runtime.is_file() and len(json.loads(fake_runtime.read_text())) == 1 + 2 * 8
    calls = FakeRuntime.calls
    again = layer_latency.layer_latency_table(model, calib(2), varying, "onnxruntime", 1)
    assert FakeRuntime.calls == calls and vars(again["fc1"]) == vars(table["fc1"])  # all from the cache


def test_table_times_a_linear_over_channels_last_inputs(fake_runtime):
    """A Linear over (B, H, W, C), as in ConvNeXt's blocks, is timed on inputs whose last dim is its own width."""
    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 12, 3, padding=1), nn.Linear(12, 16)

        def forward(self, x):
            return self.fc(self.conv(x).permute(0, 2, 3, 1))

    table = layer_latency.layer_latency_table(ChannelsLast(), calib(2), {"fc": {"in"}}, "onnxruntime", 1)
    linear_macs = 12 * 16 * 8 * 8  # per image: every one of the 8x8 positions
    assert table["fc"].at(1.0) == pytest.approx(PER_MAC * (linear_macs - 1), rel=1e-6)


def test_grouped_and_depthwise_convs_are_timed_with_their_groups_narrower():
    layer, macs = layer_latency._scaled(nn.Conv2d(32, 64, 3, groups=4), 0.5, {"in", "out"})
    assert (layer.in_channels, layer.out_channels, layer.groups) == (16, 32, 4) and macs == pytest.approx(0.25)
    layer, macs = layer_latency._scaled(nn.Conv2d(32, 64, 3, groups=4), 0.5, {"out"})
    assert (layer.in_channels, layer.out_channels, layer.groups) == (32, 32, 4) and macs == pytest.approx(0.5)
    layer, macs = layer_latency._scaled(nn.Conv2d(8, 16, 3, groups=8), 0.5, {"in", "out"})  # depthwise, multiplier 2
    assert (layer.in_channels, layer.out_channels, layer.groups) == (4, 8, 4) and macs == pytest.approx(0.5)


def test_target_speedup_is_met_as_measured(fake_runtime):
    model = make(TinyResNet)
    rep = prune_model(model, calib(64), structure="channels", target_speedup=1.6, round_to=2, progress=False)
    lat = rep.structure["latency"]
    assert lat["target_speedup"] == 1.6 and abs(lat["measured_speedup"] / 1.6 - 1) <= speedup.TOLERANCE + 0.1
    assert lat["tries"] and all(t["measured_speedup"] > 1 for t in lat["tries"])
    assert rep.structure["target"] == {"speedup": 1.6} and lat["reached"] is True
    macs_dense, macs_kept = rep.structure["macs"]
    assert macs_kept < macs_dense / 1.2  # fewer multiply-adds ...
    assert model(calib(4)).shape == (4, 5)  # ... and the smaller network runs


def test_target_speedup_options_are_checked(fake_runtime):
    with pytest.raises(UserError, match="exactly one of keep_macs"):
        prune_model(make(TinyResNet), calib(), structure="channels", keep_macs=0.5, target_speedup=2.0)
    with pytest.raises(UserError, match="target_speedup must be above 1"):
        prune_model(make(TinyResNet), calib(), structure="channels", target_speedup=0.5)
    with pytest.raises(UserError, match="give that too"):
        prune_model(make(TinyResNet), calib(), sparsity=0.5, target_speedup=2.0)
    with pytest.raises(UserError, match="tensorrt runtime is not built"):  # before any work
        prune_model(make(TinyResNet), calib(), structure="channels", target_speedup=2.0, speedup_runtime="tensorrt")
    with pytest.raises(UserError, match="out of reach"):
        prune_model(make(TinyResNet), calib(64), structure="channels", target_speedup=50.0, round_to=2,
                    progress=False)


def test_a_target_no_try_reaches_is_said_in_one_warning(fake_runtime, monkeypatch):
    """A runtime on which the smaller network is slower (INT8's narrow convs on ResNet-20): the closest try is kept
    and the report says it missed, with one warning that says why."""
    monkeypatch.setattr(speedup, "side_by_side", lambda models, x, **kw: (None, {"dense": 1.0, "pruned": 1.1}))
    with pytest.warns(RuntimeWarning, match=r"target_speedup 1.6x not reached .* measured 0.91x.*no try was faster"):
        rep = prune_model(make(TinyResNet), calib(64), structure="channels", target_speedup=1.6, round_to=2,
                          progress=False)
    assert rep.structure["latency"]["reached"] is False


def test_search_converges_where_measured_is_far_from_predicted():
    """Measured = goal^-1.7 (ResNet-50's shape: predicted 2x measured 3x): within 3 tries of 1%."""
    def measure(goal):
        return goal ** -1.7

    tries = [(0.5, measure(0.5))]
    for _ in range(3):
        g = speedup.next_goal(tries, 2.0)
        tries.append((g, measure(g)))
    assert abs(tries[-1][1] / 2.0 - 1) < 0.01
    assert speedup.next_goal([(1.0, 1.0)], 4.0) == 0.5  # at most a factor 2 per step without a bracket


def test_the_cli_says_a_missed_target_in_its_warning_and_summary(fake_runtime, monkeypatch, tmp_path, data_dir,
                                                                 capsys):
    from cnn_sparsegpt.commands.cli import main
    from cnn_sparsegpt.models import create_model

    monkeypatch.setattr(speedup, "side_by_side", lambda models, x, **kw: (None, {"dense": 1.0, "pruned": 1.1}))
    ckpt = tmp_path / "mnist_cnn.pt"
    torch.manual_seed(0)
    torch.save(create_model("mnist_cnn").state_dict(), ckpt)
    assert main(["prune", "--model", "mnist_cnn", "--weights", str(ckpt), "--data-dir", str(data_dir), "--structure",
                 "channels", "--target-speedup", "1.6", "--nsamples", "32", "--eval-samples", "64", "--out",
                 str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert "warning: target_speedup 1.6x not reached" in err and "no try was faster" in err
    assert "(target 1.6x, " in out and ": not reached)" in out
    assert json.loads((tmp_path / "run" / "report.json").read_text())["structure"]["latency"]["reached"] is False


def test_views_are_timed_as_the_users_layers(fake_runtime, monkeypatch):
    """Layers the prune sees through Conv2d views (pruning/conv_views.py: a ConvTranspose2d, a Conv3d) are timed as
    themselves, in the table and in the side-by-side timings: the runtime never gets a view, whose re-arranged
    input (zeros between pixels, depth taps copied) it would run at another speed than the user's layer."""
    from cnn_sparsegpt.pruning.conv_views import ConvView

    from .test_conv_views import unet, video
    seen = []

    class Recording(FakeRuntime):
        def __init__(self, model, example, threads):
            seen.append({type(m) for m in model.modules()})
            super().__init__(model, example, threads)

    monkeypatch.setattr(layer_latency, "runtime_class", lambda name: Recording)
    monkeypatch.setattr(speedup, "runtime_class", lambda name: Recording)
    for build, kind, names in ((unet, nn.ConvTranspose2d, {"up", "up2"}), (video, nn.Conv3d, {"3", "6"})):
        seen.clear()
        model, x = build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (whether the fake runtime's target is reached is not the point here)
            rep = prune_model(model, x, structure="channels", target_speedup=1.3, round_to=2, progress=False)
        assert seen and not any(issubclass(t, ConvView) for types in seen for t in types)
        assert any(kind in types for types in seen)
        assert names <= set(rep.structure["latency"]["table"])  # the user's layer names
