"""`--dataset FILE.pt`: model inputs stored as tensors (1-D signals, spectrograms, volumes), for the models that do
not take images: prune, finetune, export and their errors."""
import importlib.util
import json

import pytest
import torch

from cnn_sparsegpt.commands.cli import main

NET = '''
from torch import nn

def Net(num_classes=4):  # a 1-D CNN over two-channel signals
    return nn.Sequential(nn.Conv1d(2, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Conv1d(16, 32, 5, padding=2, stride=2), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Conv1d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, num_classes))
'''


@pytest.fixture()
def signals(tmp_path):
    (tmp_path / "net1d.py").write_text(NET)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(160, 2, 64, generator=g), torch.randint(0, 4, (160,), generator=g)
    torch.save({"train": x[:120], "train_labels": y[:120], "test": x[120:], "test_labels": y[120:]},
               tmp_path / "data.pt")
    torch.save({"train": x}, tmp_path / "unlabelled.pt")
    net: dict = {}
    exec(NET, net)
    torch.manual_seed(0)
    torch.save(net["Net"]().state_dict(), tmp_path / "w.pt")
    return tmp_path


def _prune(capsys, path, dataset, out, *extra):
    code = main(["-q", "prune", "--model", f"{path / 'net1d.py'}:Net", "--weights", str(path / "w.pt"),
                 "--dataset", str(path / dataset), "--nsamples", "64", "--out", str(path / out), *extra])
    return code, capsys.readouterr()


def test_a_tensor_file_of_signals_goes_through_prune_finetune_and_export(signals, capsys):
    code, said = _prune(capsys, signals, "data.pt", "run", "--nm", "2:4")
    assert code == 0, said.err
    report = json.loads((signals / "run" / "report.json").read_text())
    assert report["metric"] == "top1" and report["eval_samples"] == 40 and report["input_shape"] == [2, 64]
    assert report["sparsity"] == 0.5 and "tensor file" in report["data_source"]
    assert "preprocessing: none: the inputs as" in said.out
    assert main(["-q", "finetune", str(signals / "run"), "--max-steps", "3", "--batch-size", "16"]) == 0
    code, said = _prune(capsys, signals, "unlabelled.pt", "run2", "--sparsity", "0.5")  # measured by its outputs
    assert code == 0, said.err
    report = json.loads((signals / "run2" / "report.json").read_text())
    assert report["metric"] == "output" and report["eval_split"].startswith("holdout")
    if importlib.util.find_spec("onnxruntime"):
        assert main(["-q", "export", str(signals / "run"), "--onnx", str(signals / "m.onnx")]) == 0


def test_a_volume_cnn_fine_tunes(tmp_path, capsys):
    """A Conv3d network's run (volumes in a tensor file) fine-tunes: its weights are not put channels-last."""
    (tmp_path / "net3d.py").write_text(
        "from torch import nn\n\ndef Net(num_classes=3):\n"
        "    return nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3, padding=1), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, num_classes))\n")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 1, 6, 6, 6, generator=g), torch.randint(0, 3, (50,), generator=g)
    torch.save({"train": x[:40], "train_labels": y[:40], "test": x[40:], "test_labels": y[40:]}, tmp_path / "vol.pt")
    assert main(["-q", "prune", "--model", f"{tmp_path / 'net3d.py'}:Net", "--dataset", str(tmp_path / "vol.pt"),
                 "--nm", "2:4", "--nsamples", "16", "--out", str(tmp_path / "run")]) == 0
    assert main(["-q", "finetune", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "8"]) == 0


def test_a_video_classifier_takes_clips_from_a_tensor_file(tmp_path, capsys):
    """torchvision's video classifiers take a batch of clips: from a tensor file (pruned so in an ad hoc run of
    r3d_18, 55 s on this CPU), with an image dataset one error line."""
    assert main(["prune", "--model", "torchvision:r3d_18", "--dataset", "cifar10", "--sparsity", "0.5",
                 "--out", str(tmp_path / "o")]) == 2
    assert "is a video classifier: give it clips as a tensor file" in capsys.readouterr().err


def test_a_tensor_file_that_is_not_one_is_one_error_line(signals, capsys):
    torch.save({"inputs": torch.randn(4, 2, 8)}, signals / "no_train.pt")
    torch.save({"train": torch.randn(4, 2, 8), "train_labels": torch.zeros(3, dtype=torch.long)},
               signals / "bad_labels.pt")
    for dataset, extra, said in (("no_train.pt", [], "is not a tensor dataset: a dict with 'train'"),
                                 ("bad_labels.pt", [], "'train_labels' must hold one class index per input (4)"),
                                 ("data.pt", ["--image-size", "32"], "holds the model's inputs as they are")):
        code, out = _prune(capsys, signals, dataset, "o", "--sparsity", "0.5", *extra)
        assert code == 2 and said in out.err and "Traceback" not in out.err
