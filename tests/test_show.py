"""`cnn-sparsegpt show`: what runs gave, read back from their folders."""
import pytest
import torch

from cnn_sparsegpt import create_model
from cnn_sparsegpt.commands.cli import main

from .conftest import DATA


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two prunes of the MNIST CNN (2:4 with a fine-tuning, latency and a compressed export; 50% as published)."""
    if not (DATA / "MNIST" / "raw").is_dir():
        pytest.skip("../shared/data/MNIST not present")
    d, data = tmp_path_factory.mktemp("show"), str(DATA)
    torch.manual_seed(0)
    ckpt = d / "mnist_cnn.pt"
    torch.save(create_model("mnist_cnn").state_dict(), ckpt)
    common = ["-q", "prune", "--model", "mnist_cnn", "--weights", str(ckpt), "--data-dir", data, "--nsamples", "32",
              "--eval-samples", "64"]
    assert main([*common, "--nm", "2:4", "--out", str(d / "nm")]) == 0
    assert main([*common, "--sparsity", "0.5", "--recipe", "published", "--out", str(d / "half")]) == 0
    assert main(["-q", "finetune", str(d / "nm"), "--max-steps", "2", "--data-dir", data]) == 0
    assert main(["-q", "latency", str(d / "nm"), "--runtime", "torch", "--batch-sizes", "1", "--warmup", "0",
                 "--runs", "1", "--rounds", "1"]) == 0
    assert main(["-q", "export", str(d / "nm"), "--compressed", str(d / "nm" / "model.safetensors")]) == 0
    return d


def test_one_run_in_full_with_what_was_done_with_it(runs, capsys):
    capsys.readouterr()
    assert main(["show", str(runs / "nm")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{runs / 'nm'}:\nlayer") and "sparsity 0.500 of the pruned layers" in out
    assert "speed-up" in out and "exported" in out and "of the fp32 state dict" in out  # latency, export
    assert "fine-tuning" in out.split("\n\n")[-1]  # the runs inside it, one line each: its finetune/


def test_several_runs_side_by_side(runs, capsys):
    capsys.readouterr()
    assert main(["show", str(runs / "nm"), str(runs / "half")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("run") and len(lines) == 4  # nm, nm/finetune, half
    nm, tuned, half = lines[1:]
    assert "2:4" in nm and "x (torch, batch 1)" in nm and "fine-tuning" in tuned and "0.5" in half
    assert "as published" in half and "%" in half


def test_a_folder_without_runs_is_one_line(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no run in" in err and "Traceback" not in err
