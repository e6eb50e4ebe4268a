"""The dense model's top-1 is measured once per checkpoint, images, device and settings (commands/
dense_accuracy_cache.py); anything different is measured again."""
import json

import pytest
import torch

from cnn_sparsegpt import create_model
from cnn_sparsegpt.commands.cli import main
from cnn_sparsegpt.data.datasets import data_digest
from cnn_sparsegpt.data.folders import FolderSet
from cnn_sparsegpt.data.preprocess import Preprocess


def _prune(data_dir, ckpt, out, *extra, pattern=("--sparsity", "0.5")):
    assert main(["-q", "prune", "--model", "mnist_cnn", "--weights", str(ckpt), "--data-dir", str(data_dir),
                 "--nsamples", "16", "--eval-samples", "200", *pattern, "--method", "magnitude", "--recipe",
                 "published", "--out", str(out), *extra]) == 0
    return json.loads((out / "report.json").read_text())


def test_a_second_prune_of_the_same_checkpoint_reads_the_dense_accuracy(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_SPARSEGPT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    ckpt = tmp_path / "a.pt"
    torch.save(create_model("mnist_cnn").state_dict(), ckpt)
    first = _prune(data_dir, ckpt, tmp_path / "1")
    second = _prune(data_dir, ckpt, tmp_path / "2", pattern=("--nm", "2:4"))  # another pattern, the same dense model
    assert first["dense_acc_from"] == "measured" and second["dense_acc_from"].startswith("cache")
    assert second["dense_acc"] == first["dense_acc"]
    # other images, other weights, or asked not to: measured
    assert _prune(data_dir, ckpt, tmp_path / "3", "--eval-samples", "100")["dense_acc_from"] == "measured"
    torch.save(create_model("mnist_cnn").state_dict(), ckpt)  # new random weights under the same name
    assert _prune(data_dir, ckpt, tmp_path / "4")["dense_acc_from"] == "measured"
    assert _prune(data_dir, ckpt, tmp_path / "5", "--no-reuse-dense")["dense_acc_from"] == "measured"
    assert _prune(data_dir, ckpt, tmp_path / "6")["dense_acc_from"].startswith("cache")
    (tmp_path / "cache" / "dense_accuracy.json").write_text("{not json")  # a broken cache: measured, then rewritten
    assert _prune(data_dir, ckpt, tmp_path / "7")["dense_acc_from"] == "measured"
    assert _prune(data_dir, ckpt, tmp_path / "8")["dense_acc_from"].startswith("cache")


def test_a_streamed_folders_digest_follows_its_files(tmp_path):
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.jpg")
        files[-1].write_bytes(b"x" * (i + 1))
    pre = Preprocess(mean=(0.5,), std=(0.5,), source="test")
    data = FolderSet(files=list(map(str, files)), labels=torch.tensor([0, 1, 0]), classes=["a", "b"],
                     preprocess=pre, source="test")
    before = data_digest(data)
    assert data_digest(data) == before and data_digest(data.subset(torch.tensor([0, 1]))) != before
    files[1].write_bytes(b"yyyy")  # an image replaced
    assert data_digest(data) != before
    assert data_digest([torch.zeros(1)]) is None  # data it cannot identify: nothing cached


@pytest.mark.parametrize("flag", ["--reuse-dense", "--no-reuse-dense"])
def test_the_flag_is_documented(flag, capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert flag in capsys.readouterr().out
