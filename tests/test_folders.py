"""ImageNet-style folders: streaming, preprocessing equal to torchvision's, class order, model zoo and files."""
import dataclasses
import json

import pytest
import torch
from PIL import Image

import cnn_sparsegpt.data.folders as folder
from cnn_sparsegpt import (
    UserError,
    calibration_set,
    create_model,
    load_dataset,
    load_state_dict,
)
from cnn_sparsegpt.commands.cli import main
from cnn_sparsegpt.commands.pipeline import checkpoint_state
from cnn_sparsegpt.models import head_classes
from cnn_sparsegpt.data.preprocess import from_model, imagenet, resolve
from cnn_sparsegpt.data.synthetic import make_imagefolder
from cnn_sparsegpt.models.pretrained import pretrained_file
from cnn_sparsegpt.checkpoints import fit_keys


@pytest.fixture(scope="module")
def inet(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("inet"), classes=4, train_per_class=6, val_per_class=3,
                            min_side=40, max_side=300)


def test_streamed_matches_torchvision_preprocessing_bit_for_bit(inet):
    torchvision = pytest.importorskip("torchvision")
    val = load_dataset(str(inet), False, preprocess=imagenet(), streaming="on")
    assert val.storage == "streamed" and len(val) == 12
    x, y = next(val.batches(12, "cpu"))
    ref = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()  # resize 256, crop 224, bilinear
    expected = torch.stack([ref(Image.open(f).convert("RGB")) for f in val.files])
    assert x.shape == (12, 3, 224, 224) and torch.equal(x, expected)
    # the in-memory path serves the same tensors
    mem = load_dataset(str(inet), False, preprocess=imagenet(), streaming="off")
    assert mem.storage == "memory" and torch.equal(next(mem.batches(12, "cpu"))[0], expected)
    assert torch.equal(y, mem.labels)


def test_torchvision_v2_and_timm_presets_from_metadata():
    p = from_model("torchvision:resnet50")  # DEFAULT = IMAGENET1K_V2: resize 232, crop 224
    assert (p.resize, p.crop, p.interpolation) == (232, 224, "bilinear") and p.mean == (0.485, 0.456, 0.406)
    pytest.importorskip("timm")
    t = from_model("timm:resnet50")
    assert t.crop == 224 and t.resize == int(224 / 0.95) and t.interpolation == "bicubic"


def test_torchvision_segmentation_preset_is_its_resize_with_a_square_crop():
    """torchvision's segmentation weights resize the shorter side to 520 and crop nothing; a batch needs one shape,
    so the crop is the shorter side (the scale the weights were trained at, not ImageNet's 224)."""
    p = from_model("torchvision:deeplabv3_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large-fc3c493d.pth")
    assert (p.resize, p.crop, p.mean) == (520, 520, (0.485, 0.456, 0.406)) and "COCO_WITH_VOC_LABELS_V1" in p.source


def test_torchvision_weight_version_from_the_file_name():
    """The classic ResNet-50 file is IMAGENET1K_V1 (resize 256), not DEFAULT's V2 (232): matched by file name or
    hash; an unknown name assumes DEFAULT and says so, with how to choose."""
    v1 = resolve("auto", "torchvision:resnet50", "/x", weights_file="/models/resnet50-0676ba61.pth")
    assert (v1.resize, v1.crop) == (256, 224) and "IMAGENET1K_V1" in v1.source and "assumed" not in v1.source
    renamed = from_model("torchvision:resnet50", "my_copy_of_resnet50-0676ba61.pt")
    assert renamed.resize == 256
    v2 = from_model("torchvision:resnet50", "resnet50-11ad3fa6.pth")
    assert v2.resize == 232 and "assumed" not in v2.source
    unknown = from_model("torchvision:resnet50", "finetuned.pt")
    assert unknown.resize == 232 and "DEFAULT assumed" in unknown.source and "--preprocess imagenet" in unknown.source
    assert "no weights file given" in from_model("torchvision:resnet50").source  # random weights: nothing to match
    assert from_model("torchvision:mobilenet_v3_large", "mobilenet_v3_large-8738ca79.pth").resize == 256


def test_auto_resolution_order():
    assert resolve("auto", "resnet18_cifar", "cifar10").std == (0.2470, 0.2435, 0.2616)
    assert resolve("auto", "torchvision:resnet18", "cifar10").crop is None  # 32x32 datasets keep their convention
    assert resolve("auto", "torchvision:resnet50", "/x").crop == 224
    meta = {"normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    assert resolve("auto", "torchvision:resnet50", "/x", meta).mean == (0.5, 0.5, 0.5)  # checkpoint first
    p = resolve("imagenet", "x", "/x", image_size=160, crop_pct=0.8)
    assert (p.crop, p.resize) == (160, 200)
    with pytest.raises(UserError, match="--crop-pct"):
        resolve("imagenet", "x", "/x", crop_pct=1.5)


def test_calibration_decodes_only_what_it_draws(inet, monkeypatch):
    calls = []
    real = folder._decode
    monkeypatch.setattr(folder, "_decode",
                        lambda data, pre, size=None, **kw: calls.append(data) or real(data, pre, size, **kw))
    train = dataclasses.replace(load_dataset(str(inet), True, preprocess=imagenet(), streaming="on"), workers=0)
    assert calls == [] and len(train) == 24  # listing the folder decodes nothing
    a = calibration_set(train, 5, seed=1)
    assert len(calls) == 5 and a.shape == (5, 3, 224, 224)
    assert torch.equal(a, calibration_set(train, 5, seed=1))  # the same images for every method
    assert not torch.equal(a, calibration_set(train, 5, seed=2))


def test_class_order_is_sorted_wnids(inet, tmp_path):
    train = load_dataset(str(inet), True, preprocess=imagenet(), streaming="on")
    wnids = sorted(p.name for p in (inet / "train").iterdir())
    assert train.classes == wnids
    assert all(f.split("/")[-2] == wnids[label] for f, label in zip(train.files, train.labels.tolist()))
    val = load_dataset(str(inet), False, preprocess=imagenet(), streaming="on")
    assert val.classes == wnids and sorted(set(val.labels.tolist())) == [0, 1, 2, 3]
    odd = make_imagefolder(tmp_path / "odd", classes=2, train_per_class=1, val_per_class=1)
    (odd / "val" / "n99999999").mkdir()
    Image.new("RGB", (50, 40)).save(odd / "val" / "n99999999" / "a.JPEG")
    with pytest.raises(UserError, match="val/ has classes that train/ lacks"):
        load_dataset(str(odd), False, preprocess=imagenet(), streaming="on")


def test_streaming_needs_a_fixed_size_and_a_folder(inet, tmp_path):
    with pytest.raises(UserError, match="needs one image size"):
        load_dataset(str(inet), True, streaming="on")  # no crop: images of many sizes
    with pytest.raises(UserError, match="cannot be streamed"):
        (tmp_path / "a.tar.gz").write_bytes(b"")
        load_dataset(str(tmp_path / "a.tar.gz"), True, preprocess=imagenet(), streaming="on")


def test_auto_streams_by_decoded_size(inet, monkeypatch):
    assert load_dataset(str(inet), True, preprocess=imagenet()).storage == "memory"  # 24 x 150 KB
    monkeypatch.setattr(folder, "STREAM_ABOVE_BYTES", 1000)
    assert load_dataset(str(inet), True, preprocess=imagenet()).storage == "streamed"


def test_checkpoint_formats_and_head(tmp_path):
    model = create_model("torchvision:resnet18", num_classes=4)
    state = model.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "w.pth")
    loaded = load_state_dict(tmp_path / "w.pth")
    assert loaded.keys() == state.keys() and head_classes("torchvision:resnet18", loaded) == 4
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    assert all(torch.equal(load_state_dict(tmp_path / "w.safetensors")[k], v) for k, v in state.items())
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a valid safetensors"):
        load_state_dict(tmp_path / "bad.safetensors")


def test_wrapped_checkpoint_keys_fitted_to_the_model(tmp_path):
    """A PyTorch Lightning module's checkpoint holds the network under its attribute ('model.'), beside a loss's
    weights: the model's keys are found under the prefix, the rest is named and left out; two copies (a model and
    its EMA) are one UserError; a file that fits no prefix is returned as it is."""
    model = create_model("torchvision:resnet18", num_classes=4)
    state = model.state_dict()
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in state.items()}, "criterion.weight": torch.ones(4)},
                "hyper_parameters": {"lr": 0.1}}, tmp_path / "lightning.ckpt")
    with pytest.warns(RuntimeWarning, match="under 'model.'; left out: criterion"):
        loaded = load_state_dict(tmp_path / "lightning.ckpt", model=model)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    with pytest.warns(RuntimeWarning):
        assert checkpoint_state("torchvision:resnet18", tmp_path / "lightning.ckpt")[0].keys() == state.keys()
    torch.save({**{f"net.{k}": v for k, v in state.items()}, **{f"ema.module.{k}": v for k, v in state.items()}},
               tmp_path / "two.pt")
    with pytest.raises(UserError, match="2 times .*'net.', 'ema.module.'"):
        load_state_dict(tmp_path / "two.pt", model=model)
    other = {"conv.weight": torch.ones(1)}
    assert fit_keys(other, state.keys(), "x.pt") is other


def _prune(capsys, args):
    code = main(["-q", "prune"] + args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow  # > 6 s on 2 cores
def test_cli_prunes_a_pretrained_style_model_on_a_streamed_folder(inet, tmp_path, capsys):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("torchvision:resnet18", 4).state_dict().items()},
              str(weights))
    reports = {}
    for method in ("magnitude", "sparsegpt"):
        out = tmp_path / method
        code, stdout, err = _prune(capsys, ["--model", "torchvision:resnet18", "--weights", str(weights), "--dataset",
                                            str(inet), "--streaming", "on", "--workers", "0", "--image-size", "64",
                                            "--nsamples", "8", "--nm", "2:4", "--method", method, "--out", str(out),
                                            "--recipe", "published",  # the data path is under test, not the solve
                                            "--save-safetensors", "--batch-size", "4"])
        assert code == 0, err
        assert "center crop 64" in stdout and "torchvision ResNet18_Weights.IMAGENET1K_V1 metadata" in stdout
        reports[method] = json.loads((out / "report.json").read_text())
        assert (out / "model.safetensors").is_file()
    r = reports["sparsegpt"]
    assert r["data_storage"] == "streamed" and r["eval_samples"] == 12 and r["sparsity"] == 0.5
    assert r["preprocess"]["crop"] == 64 and r["preprocess"]["resize"] == int(64 / 0.875)
    assert reports["magnitude"]["calibration_digest"] == r["calibration_digest"]
    assert r["memory_policy"].startswith("default")


def test_cli_class_count_must_fit_the_head(inet, tmp_path, capsys):
    weights = tmp_path / "w.pt"
    torch.save(create_model("torchvision:resnet18", 1000).state_dict(), weights)
    code, _, err = _prune(capsys, ["--model", "torchvision:resnet18", "--weights", str(weights), "--dataset",
                                   str(inet), "--sparsity", "0.5", "--out", str(tmp_path / "o")])
    assert code == 2 and "head has 1000 outputs but" in err and "has 4 classes" in err


def test_timm_model_prunes(inet, tmp_path, capsys):
    pytest.importorskip("timm")
    code, _, err = _prune(capsys, ["--model", "timm:resnet18", "--dataset", str(inet), "--image-size", "64",
                                   "--nsamples", "8", "--nm", "2:4", "--no-evaluate", "--out", str(tmp_path / "o"),
                                   "--recipe", "published"])
    assert code == 0, err
    r = json.loads((tmp_path / "o" / "report.json").read_text())
    assert r["sparsity"] == 0.5 and r["preprocess"]["interpolation"] == "bicubic"
    code, _, err = _prune(capsys, ["--model", "timm:no_such_net", "--dataset", str(inet), "--sparsity", "0.5"])
    assert code == 2 and "unknown timm model" in err


def test_pretrained_weights_downloaded_once_into_the_hub_cache(inet, tmp_path, capsys, monkeypatch):
    """--weights pretrained: torchvision's DEFAULT file (timm's default tag) is downloaded into $TORCH_HOME's hub
    cache once, report.json names the file and the preprocessing follows its version; offline, a wrong version or a
    model without published weights is one error line."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    downloads = []

    def fake_download(url, dst, hash_prefix=None, progress=True):  # no network in tests
        downloads.append((url, hash_prefix))
        torch.save(create_model("torchvision:resnet18", 1000).state_dict(), dst)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    args = ["--dataset", str(inet), "--image-size", "48", "--nsamples", "4", "--nm", "2:4", "--no-evaluate",
            "--recipe", "published"]
    code, stdout, err = _prune(capsys, ["--model", "torchvision:resnet18", "--weights", "pretrained", *args,
                                        "--out", str(tmp_path / "tv")])
    assert code == 0, err
    report = json.loads((tmp_path / "tv" / "report.json").read_text())
    assert report["weights"] == str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    assert pretrained_file("torchvision:resnet18", "pretrained:IMAGENET1K_V1") == report["weights"]  # once
    assert downloads == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd")]
    assert "IMAGENET1K_V1" in report["preprocess"]["source"]
    def offline(*args, **kw):
        raise OSError("offline")
    for model, weights, said in (("torchvision:resnet18", "pretrained:IMAGENET1K_V9", "one of DEFAULT, IMAGENET1K_V1"),
                                 ("mnist_cnn", "pretrained", "is for torchvision:NAME, timm:NAME and hf:NAME models"),
                                 ("torchvision:resnet34", "pretrained", "could not download torchvision:resnet34")):
        monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
        code, _, err = _prune(capsys, ["--model", model, "--weights", weights, "--sparsity", "0.5", "--dataset",
                                       str(inet), "--out", str(tmp_path / "o")])
        assert code == 2 and said in err and "Traceback" not in err
    timm = pytest.importorskip("timm")
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: real(name, pretrained=False, **kw))
    weights = pretrained_file("timm:resnet18", "pretrained")  # the default tag, named
    assert weights == str(tmp_path / "torch" / "hub" / "checkpoints" / "timm_resnet18.a1_in1k.pt")
    assert load_state_dict(weights).keys() == real("resnet18").state_dict().keys()
    with pytest.raises(UserError, match="timm:resnet18.a1_in1k --weights pretrained"):
        pretrained_file("timm:resnet18", "pretrained:a1_in1k")


def test_streamed_training_batches_are_shuffled_and_augmented_each_epoch(inet):
    train = dataclasses.replace(load_dataset(str(inet), True, preprocess=imagenet(64, 48), streaming="on"),
                                workers=0)
    assert train.augment == "resized-crop-flip"
    torch.manual_seed(0)
    loader = train.loader(8, "cpu", seed=0)
    assert len(loader) == 3
    epochs = [[(x, y) for x, y in loader] for _ in range(2)]
    for batches in epochs:
        assert all(x.shape[1:] == (3, 48, 48) and x.dtype == torch.float32 for x, _ in batches)
        assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(train.labels.tolist())
    first = torch.cat([y for _, y in epochs[0]])
    assert not torch.equal(first, train.labels) or not torch.equal(first, torch.cat([y for _, y in epochs[1]]))
    plain = torch.cat([x for x, _ in train.batches(8, "cpu")])  # evaluation geometry: the center crop, no flips
    assert not torch.equal(torch.cat([x for x, _ in epochs[0]]).sort(0)[0], plain.sort(0)[0])


def test_finetune_streams_a_large_folder(inet, tmp_path, capsys):
    weights = tmp_path / "r18.pt"
    torch.save(create_model("torchvision:resnet18", 4).state_dict(), weights)
    run = tmp_path / "run"
    code, _, err = _prune(capsys, ["--model", "torchvision:resnet18", "--weights", str(weights), "--dataset",
                                   str(inet), "--streaming", "on", "--workers", "0", "--image-size", "48",
                                   "--nsamples", "8", "--sparsity", "0.5", "--recipe", "published",
                                   "--batch-size", "4", "--out", str(run)])
    assert code == 0, err
    assert main(["-q", "finetune", str(run), "--streaming", "on", "--workers", "0", "--batch-size", "4",
                 "--max-steps", "3", "--holdout", "4", "--out", str(tmp_path / "ft")]) == 0
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["finetune"]["best_epoch_chosen_on"] == "holdout 4"
    state, masks = torch.load(tmp_path / "ft" / "model.pt"), torch.load(tmp_path / "ft" / "masks.pt")
    for name, keep in masks.items():
        assert torch.equal(state[name][~keep], torch.zeros(int((~keep).sum())))
