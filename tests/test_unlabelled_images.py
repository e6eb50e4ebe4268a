"""Models that are not classifiers, from the command line: folders of images without labels, and `--metric output`
(the pruned model's outputs against the dense model's) where top-1 cannot be measured."""
import importlib.util
import json
import math
import textwrap

import pytest
import torch
from PIL import Image
from torch import nn

import cnn_sparsegpt as cs
from cnn_sparsegpt import UserError, create_model
from cnn_sparsegpt.commands.bench import BenchConfig, BenchModel, read_rows, run_bench
from cnn_sparsegpt.commands.cli import main
from cnn_sparsegpt.commands.export import RunData, export_run
from cnn_sparsegpt.commands.latency import measure_latency
from cnn_sparsegpt.commands.pipeline import load_run, run_images
from cnn_sparsegpt.commands.plot import make_plots
from cnn_sparsegpt.commands.train import compare_outputs, output_error
from cnn_sparsegpt.data.datasets import ImageSet, load_splits
from cnn_sparsegpt.data.folders import list_folder
from cnn_sparsegpt.data.preprocess import imagenet
from cnn_sparsegpt.utils import file_stem

NET = '''
import torch
from torch import nn


class Denoiser(nn.Module):
    """An encoder-decoder that returns a dict, as torchvision's segmentation models do."""

    def __init__(self):
        super().__init__()
        self.encode = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                    nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                    nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.decode = nn.Sequential(nn.ConvTranspose2d(32, 16, 2, stride=2), nn.ReLU(), nn.Conv2d(16, 3, 3, padding=1))

    def forward(self, x):
        return {"out": self.decode(self.encode(x))}


def classifier(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
'''


def write_images(root, names, size=(12, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(*size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(path)


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent(NET))
    return path


@pytest.fixture
def flat_images(tmp_path):
    """40 images in two subfolders that are not classes (no train/, no val/)."""
    root = tmp_path / "photos"
    write_images(root, [f"{'day' if i % 2 else 'night'}/{i:02d}.png" for i in range(40)])
    return root


def test_folders_without_class_layout_are_unlabelled(tmp_path, flat_images):
    splits = list_folder(flat_images, "auto")
    assert set(splits) == {"train"} and len(splits["train"]) == 40 and {c for c, _ in splits["train"]} == {None}
    with pytest.raises(UserError, match="not an ImageFolder layout.*--metric output"):
        list_folder(flat_images, "classes")
    # train/ and val/ of images at any depth, their subfolders not the same "classes" (cities): both splits kept;
    # auto cannot tell them from a misplaced class folder, so it says how to read them
    cities = tmp_path / "cities"
    write_images(cities, ["train/aachen/a.png", "train/bonn/b.png", "train/bonn/c.png", "val/mainz/d.png"])
    splits = list_folder(cities, "none")
    assert {s: len(v) for s, v in splits.items()} == {"train": 3, "val": 1}
    with pytest.raises(UserError, match="val/ has classes that train/ lacks.*--metric output"):
        list_folder(cities, "auto")
    # an ImageFolder of classes stays one under auto, and "none" reads the same files without their classes
    inet = tmp_path / "inet"
    write_images(inet, ["train/cat/1.png", "train/dog/2.png", "val/cat/3.png"])
    assert {c for c, _ in list_folder(inet, "auto")["train"]} == {"cat", "dog"}
    assert [f for _, f in list_folder(inet, "none")["train"]] == [f for _, f in list_folder(inet, "auto")["train"]]
    train, test = load_splits(str(flat_images), labels="auto")
    assert test is None and len(train) == 40 and not train.labelled and (train.labels == -1).all()
    streamed, test = load_splits(str(flat_images), preprocess=imagenet(12, 8), streaming="on", labels="auto")
    assert test is None and streamed.storage == "streamed" and not streamed.labelled and len(streamed) == 40
    x, y = next(streamed.batches(4, "cpu"))
    assert x.shape == (4, 3, 8, 8) and (y == -1).all()
    train, test = load_splits(str(inet), labels="auto")
    assert train.labelled and test.labelled and train.classes == ["cat", "dog"]


def test_output_error_is_relative_to_the_reference():
    data = ImageSet(torch.randint(0, 255, (10, 3, 8, 8), dtype=torch.uint8), torch.full((10,), -1), (0.5,) * 3,
                    (0.25,) * 3, "random")
    dense = nn.Conv2d(3, 4, 3)
    scaled = nn.Conv2d(3, 4, 3)
    scaled.load_state_dict({k: 1.1 * v for k, v in dense.state_dict().items()})  # every output 1.1 times
    assert output_error(dense, dense, data, progress=False) == 0
    same = compare_outputs(dense, dense, data, progress=False, scores=True)
    assert same == {"error": 0, "agreement": 1, "agreement_over": "positions"}
    assert compare_outputs(dense, dense, data, progress=False)["agreement"] is None  # values: no classes to agree on
    assert output_error(scaled, dense, data, batch_size=3, progress=False) == pytest.approx(0.01, rel=1e-4)
    images = torch.randn(5, 3, 8, 8)  # the Python API's images, as prune_model takes them
    assert cs.output_error(scaled, dense, images, batch_size=2, progress=False) == pytest.approx(0.01, rel=1e-4)


def test_prune_a_model_that_is_not_a_classifier(net_file, flat_images, tmp_path, capsys):
    """A dict-returning encoder-decoder on a folder of unlabelled images: evaluation images are held out of the
    folder, the outputs are compared with the dense model's, and the run's images can be drawn again."""
    out = tmp_path / "run"
    args = ["prune", "--model", f"{net_file}:Denoiser", "--dataset", str(flat_images), "--preprocess", "none",
            "--nsamples", "16", "--nm", "2:4", "--out", str(out)]
    assert main(["-q", *args]) == 0
    printed = capsys.readouterr().out
    assert "output error" in printed and "4 held-out images; the images have no labels" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "output" and report["data_labels"] == "none" and report["eval_split"] == "holdout 4"
    assert report["dense_acc"] is None and report["pruned_acc"] is None and 0 < report["output_error"] < 1
    assert 0 < report["output_agreement"] <= 1 and report["output_agreement_over"] == "positions"  # argmax per pixel
    assert report["input_shape"] == [3, 12, 16]  # --preprocess none: the images at their size
    _, _, masks = load_run(out)
    assert set(masks) == {"encode.3.weight", "encode.6.weight", "decode.0.weight", "decode.2.weight"}
    calib, test, same = run_images(report)
    assert same and len(calib) == 16 and len(test) == 4
    with pytest.raises(UserError, match="--top1 measures a classifier's accuracy"):
        measure_latency(out, accuracy=RunData())
    with pytest.raises(UserError, match="pruned a randomly initialized model .no --weights.: there is no dense"):
        measure_latency(out)  # (the run had no checkpoint: nothing to time the pruned model against)
    if importlib.util.find_spec("onnxruntime") is not None:  # INT8 calibrated on the run's own images, no top-1
        exported = export_run(out, int8_path=tmp_path / "int8.onnx", int8=RunData(progress=False))
        assert exported["int8_calibration_is_the_runs"] and "int8_top1" not in exported
    # top-1 asked for where it cannot be measured: one line each
    assert main(["-q", *args, "--metric", "top1"]) == 2
    assert "--metric output" in capsys.readouterr().err


def test_finetune_a_model_that_is_not_a_classifier_towards_its_dense_outputs(net_file, flat_images, tmp_path, capsys):
    """`finetune` of a run measured by its outputs: the dense checkpoint's outputs are the targets (no labels), the
    masks are kept, and the output error is measured on the images prune held out, before and after."""
    torch.manual_seed(0)
    weights = tmp_path / "denoiser.pt"
    torch.save(create_model(f"{net_file}:Denoiser").state_dict(), weights)
    out = tmp_path / "run"
    assert main(["-q", "prune", "--model", f"{net_file}:Denoiser", "--weights", str(weights), "--dataset",
                 str(flat_images), "--preprocess", "none", "--nsamples", "16", "--sparsity", "0.7",
                 "--out", str(out)]) == 0
    before = json.loads((out / "report.json").read_text())["output_error"]
    prune_agreement = json.loads((out / "report.json").read_text())["output_agreement"]
    assert main(["-q", "finetune", str(out), "--epochs", "2", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "output error against the dense model: pruned" in printed and "the dense model's top class at" in printed
    r = json.loads((out / "finetune" / "report.json").read_text())
    f = r["finetune"]
    assert (f["optimizer"], f["lr"]) == ("adamw", 1e-3)  # the default for a run measured by its outputs
    # its 3 output channels read as class scores (--outputs scores): the agreement re-measured after fine-tuning
    assert f["output_agreement_before"] == pytest.approx(prune_agreement) and 0 <= r["output_agreement"] <= 1
    assert f["output_error_before"] == pytest.approx(before) and 0 <= r["output_error"] < 1
    assert [set(h) for h in f["history"]] == [{"epoch", "train_loss", "test_output_error"}] * 2
    assert "pruned_acc" not in r or r["pruned_acc"] is None
    model, _, masks = load_run(out / "finetune")
    params = dict(model.named_parameters())
    assert masks and all(torch.all(params[k][~m] == 0) for k, m in masks.items())


def test_metric_auto_keeps_top1_for_classifiers_and_output_without_labels(net_file, tmp_path, capsys):
    inet = tmp_path / "inet"
    write_images(inet, [f"{s}/{c}/{i}.png" for s, n in (("train", 12), ("val", 4)) for c in ("cat", "dog")
                        for i in range(n)])
    common = ["-q", "prune", "--model", f"{net_file}:classifier", "--preprocess", "none", "--nsamples", "8",
              "--sparsity", "0.5", "--allocation", "uniform"]
    assert main([*common, "--dataset", str(inet), "--out", str(tmp_path / "top1")]) == 0
    report = json.loads((tmp_path / "top1" / "report.json").read_text())
    assert report["metric"] == "top1" and report["data_labels"] == "classes" and report["output_error"] is None
    assert report["eval_split"] == "test" and report["eval_samples"] == 8 and 0 <= report["pruned_acc"] <= 1
    assert main([*common, "--dataset", str(inet), "--metric", "output", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["metric"] == "output" and report["data_labels"] == "none" and report["pruned_acc"] is None
    assert math.isfinite(report["output_error"]) and report["output_agreement_over"] == "images"
    assert 0 < report["output_agreement"] <= 1
    # a dict output is no (N, classes) logits: top-1 cannot be asked of it even on labelled images
    assert main([*common[:3], f"{inet.parent / 'net.py'}:Denoiser", *common[4:], "--dataset", str(inet),
                 "--metric", "top1", "--out", str(tmp_path / "bad")]) == 2
    assert "needs a classifier's (N, classes) logits" in capsys.readouterr().err


def test_bench_rows_of_a_model_that_is_not_a_classifier(net_file, flat_images, tmp_path):
    cfg = BenchConfig(models=[BenchModel(f"{net_file}:Denoiser", dataset=str(flat_images), methods=["magnitude"],
                                         patterns=["0.5"], metric="output")],
                      nsamples=[8], csv=str(tmp_path / "rows.csv"), reports=str(tmp_path / "reports"))
    run_bench(cfg, progress=False)
    (row,) = read_rows(tmp_path / "rows.csv")
    assert row["metric"] == "output" and 0 < float(row["output_error"]) < 1 and row["pruned_acc"] == ""
    pytest.importorskip("matplotlib")
    assert [p.name for p in make_plots(tmp_path / "rows.csv", tmp_path / "plots")] == [
        f"{file_stem(str(net_file))}_Denoiser_output_error_vs_sparsity.png"]
