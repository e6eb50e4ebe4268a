"""Models that predict per pixel (segmentation) or return several outputs: their scores are compared per position
(the allocation's and the channel costs' KL), resizing passes channels through, and export checks every output."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import cnn_sparsegpt as cs
from cnn_sparsegpt.pruning.output_kl import output_kls


class TinySegmenter(nn.Module):
    """torchvision's segmentation models in small: a strided backbone, a head, class scores upsampled to the input
    size, and a dict of outputs ('out' first, an auxiliary head's 'aux')."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Upsample(scale_factor=2), nn.Conv2d(32, classes, 1))
        self.aux = nn.Sequential(nn.Conv2d(32, 16, 1), nn.ReLU())
        self.aux_classifier = nn.Conv2d(16, classes, 1)

    def forward(self, x):
        features = self.backbone(x)
        size = x.shape[-2:]
        aux = self.aux_classifier(F.interpolate(self.aux(features), scale_factor=4.0))
        return {"out": F.interpolate(self.head(features), size=size, mode="bilinear", align_corners=False),
                "aux": aux}


def _model_and_images():
    torch.manual_seed(0)
    model = TinySegmenter().eval()
    return model, torch.randn(64, 3, 16, 16)


def test_output_kl_is_per_position_on_the_first_output():
    model, x = _model_and_images()
    with torch.no_grad():
        dense = model(x)["out"].double().log_softmax(1)

    class Halved:  # the change: the head's last conv at half its weight
        def __init__(self, key):
            self.w = model.head[4].weight

        def __enter__(self):
            self.saved = self.w.detach().clone()
            self.w.data.mul_(0.5)

        def __exit__(self, *exc):
            self.w.data.copy_(self.saved)

    kl = output_kls(model, x, {"half": ["head.4"]}, Halved)["half"]
    with Halved(None), torch.no_grad():
        changed = model(x)["out"].double().log_softmax(1)
    by_hand = (dense.exp() * (dense - changed)).sum(1).mean()  # over images and pixels
    assert torch.allclose(kl, by_hand, rtol=1e-9)
    # outputs that are values: the relative squared error of every output tensor ('out' and 'aux' side by side)
    error = output_kls(model, x, {"half": ["head.4"]}, Halved, outputs="values")["half"]
    with torch.no_grad():
        y = torch.cat([t.flatten(1) for t in model(x).values()], 1).double()
        with Halved(None):
            y_half = torch.cat([t.flatten(1) for t in model(x).values()], 1).double()
    assert torch.allclose(error, (y_half - y).square().sum() / y.square().sum(), rtol=1e-9)


def test_a_model_that_returns_values_is_measured_by_their_squared_error():
    """An image-to-image model (outputs='values'): the dp allocation's and the channel costs' output measure is the
    relative squared error, not a KL over its colour channels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 3, 3, padding=1)).eval()
    x = torch.randn(32, 3, 12, 12)
    base = cs.prune_model(copy.deepcopy(model), x, sparsity=0.5, outputs="values")
    assert base.allocation["dp_measure"] == "kl" and base.config.outputs == "values"
    measured = torch.tensor(list(base.allocation["kl_at_sparsity"].values()))
    assert measured.min() > 0 and measured.max() < 1  # relative errors, each layer pruned alone
    report = cs.prune_model(copy.deepcopy(model), x, structure="channels", keep_macs=0.6, round_to=4,
                            outputs="values")
    assert report.structure["macs"][1] <= 0.6 * report.structure["macs"][0]
    gray = nn.Sequential(*list(model)[:-1], nn.Conv2d(16, 1, 3, padding=1))  # one channel: its softmax is always 1
    with pytest.warns(RuntimeWarning, match="one channel, whose softmax is always 1"):
        report = cs.prune_model(gray, x, sparsity=0.5)
    assert min(report.allocation["kl_at_sparsity"].values()) > 0  # measured as values, not a KL of 0 everywhere


def _no_fallback(caught) -> None:
    assert not [w for w in caught if "output scores" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"nm": "2:4"}])
def test_a_segmentation_model_prunes_with_the_default_recipe(pattern):
    model, x = _model_and_images()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = cs.prune_model(model, x, **pattern)
    _no_fallback(caught)
    assert report.sparsity == pytest.approx(0.5, abs=0.02)
    if "sparsity" in pattern:  # the default's dp allocation measured each layer's KL on the scores
        assert report.allocation["dp_measure"] == "kl" and len(report.allocation["kl_at_sparsity"]) > 0
    assert model(x)["out"].shape == (64, 5, 16, 16)


def test_a_segmentation_model_loses_channels_through_resizing(tmp_path):
    model, x = _model_and_images()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = cs.prune_model(model, x, structure="channels", keep_macs=0.6, round_to=4)
    _no_fallback(caught)  # the groups were priced by the output KL
    dense_macs, kept_macs = report.structure["macs"]
    assert kept_macs <= 0.6 * dense_macs
    for producer in ("head.0", "aux.0"):  # resized by nn.Upsample / F.interpolate on the way to their readers
        group = next(g for g in report.structure["groups"] if g["producers"] == [producer])
        assert group["kept"] < group["channels"], group
    out = model(x)
    assert out["out"].shape == out["aux"].shape == (64, 5, 16, 16)
    pytest.importorskip("onnxruntime")
    exported = cs.export_model(model, (3, 16, 16), onnx=tmp_path / "seg.onnx")
    assert exported["onnx_max_abs_diff"] < 1e-4  # both outputs checked


def test_a_model_without_scores_falls_back_to_layer_errors():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(0))  # one flat vector
    with pytest.warns(RuntimeWarning, match="output scores"):
        report = cs.prune_model(model, torch.randn(32, 3, 12, 12), sparsity=0.5, ignore=[])
    assert report.allocation["dp_measure"] == "layer"


class _Detections(nn.Module):
    """A detector's eval output as torchvision's: per image a dict of boxes and scores, as many as pass a threshold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x).flatten(2)  # (N, 8, positions)
        out = []
        for yi in y:
            keep = yi[0] > 0  # a number of boxes that differs from image to image
            out.append({"boxes": yi[:4, keep].t().contiguous(), "scores": yi[4, keep]})
        return out


def test_per_image_detections_are_not_compared_as_outputs():
    from cnn_sparsegpt.commands.train import compare_outputs
    from cnn_sparsegpt.pruning.output_kl import output_measure
    torch.manual_seed(0)
    model, x = _Detections(), torch.randn(4, 3, 8, 8)
    with pytest.raises(cs.UserError, match="a row per image: there is nothing to compare .*detector"):
        compare_outputs(model, copy.deepcopy(model), x, progress=False)
    for outputs in ("scores", "values"):
        with pytest.warns(RuntimeWarning, match="with a row per image"):
            assert output_measure(model, x, "dp_measure='kl'", "the layer measure instead", outputs) is None
