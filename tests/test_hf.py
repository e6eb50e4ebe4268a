"""Hugging Face image classifiers as `--model hf:NAME` (a local folder here: the Hub is the same code once cached):
built from their config, `--weights pretrained` their model.safetensors, preprocessing from their image processor's
config, top-1 on their output's logits."""
import json

import pytest
import torch

from cnn_sparsegpt import UserError, create_model
from cnn_sparsegpt.commands.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture
def hf_folder(tmp_path):
    """A tiny ResNet for MNIST as `save_pretrained` writes it, with a ConvNeXt-style preprocessor_config.json
    (resize the shorter side to 32 / 0.875, crop 32)."""
    torch.manual_seed(0)
    config = transformers.ResNetConfig(num_labels=10, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                       num_channels=1)
    folder = tmp_path / "tiny-resnet"
    transformers.ResNetForImageClassification(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_pct": 0.875, "do_normalize": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.25, 0.25], "resample": 3, "size": {"shortest_edge": 32}}))
    return folder


def test_an_hf_classifier_prunes_from_the_command_line(hf_folder, data_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["-q", "prune", "--model", f"hf:{hf_folder}", "--weights", "pretrained", "--dataset", "mnist",
                 "--data-dir", str(data_dir), "--nm", "2:4", "--nsamples", "32", "--eval-samples", "64",
                 "--out", str(run)]) == 0
    r = json.loads((run / "report.json").read_text())
    assert r["weights"] == str(hf_folder / "model.safetensors") and r["metric"] == "top1"
    assert sum(not x["skipped"] for x in r["layers"]) >= 4 and r["sparsity"] == 0.5
    assert main(["-q", "export", str(run), "--safetensors", str(tmp_path / "m.safetensors")]) == 0


def test_an_hf_models_preprocessing_is_its_image_processors(hf_folder, tmp_path):
    """(An image folder's; CIFAR-10 and MNIST keep their own convention for any model.)"""
    from cnn_sparsegpt.data.preprocess import from_model

    p = from_model(f"hf:{hf_folder}")
    assert (p.resize, p.crop, p.interpolation, p.mean, p.std) == (36, 32, "bicubic", (0.5,) * 3, (0.25,) * 3)
    assert "preprocessor_config" in p.source
    (hf_folder / "preprocessor_config.json").write_text(json.dumps({  # ViT's: a size and a crop size
        "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256},
        "resample": 2}))
    p = from_model(f"hf:{hf_folder}")
    assert (p.resize, p.crop, p.interpolation, p.mean) == (256, 224, "bilinear", (0.485, 0.456, 0.406))
    (hf_folder / "preprocessor_config.json").unlink()
    assert from_model(f"hf:{hf_folder}") is None  # then the dataset's convention, or ImageNet's for a folder


def test_hf_models_are_built_from_their_config(hf_folder, tmp_path):
    model = create_model(f"hf:{hf_folder}", num_classes=7, kwargs={"hidden_act": "relu"})
    out = model.eval()(torch.randn(2, 1, 32, 32))
    assert out.logits.shape == (2, 7)
    with pytest.raises(UserError, match="no model config"):
        create_model(f"hf:{tmp_path / 'missing'}")
    text = tmp_path / "bert"
    transformers.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                            intermediate_size=16).save_pretrained(text)
    with pytest.raises(UserError, match="not an image classifier"):
        create_model(f"hf:{text}")
