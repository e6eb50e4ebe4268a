"""Registry models, the shared ResNet-18 checkpoint, the data dispatcher and the training loop."""
import io
import tarfile

import pytest
import torch
from PIL import Image

from cnn_sparsegpt import (
    ImageSet,
    TrainConfig,
    UserError,
    calibration_set,
    create_model,
    evaluate,
    list_models,
    load_dataset,
    load_state_dict,
    train_model,
)
from cnn_sparsegpt.models import model_entry

from .conftest import DATA, RESNET_CKPT

SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@pytest.mark.parametrize("name", list_models())
def test_registry_forward(name):
    model = create_model(name, num_classes=10).eval()
    x = torch.randn(2, *SHAPES[model_entry(name).dataset])
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_torchvision_model_by_name():
    model = create_model("torchvision:resnet18", num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(UserError, match="unknown torchvision model"):
        create_model("torchvision:nope")
    with pytest.raises(UserError, match="is a detection model: the command line prunes models that take a batch.*"
                       "prune_model"):
        create_model("torchvision:fasterrcnn_mobilenet_v3_large_fpn")
    video = create_model("torchvision:r3d_18", num_classes=4).eval()  # clips, from a tensor file (test_tensor_dataset)
    with torch.no_grad():
        assert video(torch.randn(1, 3, 2, 16, 16)).shape == (1, 4)
    seg = create_model("torchvision:lraspp_mobilenet_v3_large", num_classes=5).eval()  # no backbone download
    with torch.no_grad():
        assert seg(torch.randn(1, 3, 64, 64))["out"].shape == (1, 5, 64, 64)
    aux = {"aux_classifier.4.weight": torch.zeros(1)}  # a checkpoint with the auxiliary head gets one to load into
    assert create_model("torchvision:fcn_resnet50", num_classes=3, state=aux).aux_classifier is not None
    with pytest.raises(UserError, match="choose from .*mnist_cnn"):
        create_model("nope")


@pytest.mark.slow  # > 6 s on 2 cores
def test_resnet18_checkpoint_accuracy():
    if not RESNET_CKPT.is_file() or not (DATA / "cifar10-jpeg.tar.gz").is_file():
        pytest.skip("shared checkpoint or CIFAR-10 copy missing")
    model = create_model("resnet18_cifar")
    model.load_state_dict(load_state_dict(RESNET_CKPT), strict=True)
    test = load_dataset("cifar10", False, DATA)
    assert "JPEG" in test.source and len(test) == 10000
    idx = torch.randperm(10000, generator=torch.Generator().manual_seed(0))[:1000]
    subset = ImageSet(test.images[idx], test.labels[idx], test.mean, test.std, test.source)
    acc = evaluate(model, subset, progress=False)
    assert abs(acc - 0.8309) < 4 * (0.83 * 0.17 / 1000) ** 0.5  # the JSON's accuracy, within sampling error


def test_mnist_from_shared(data_dir):
    train, test = load_dataset("mnist", True, data_dir), load_dataset("mnist", False, data_dir)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert len(test) == 10000 and train.num_classes == 10
    a, b = calibration_set(train, 64, seed=3), calibration_set(train, 64, seed=3)
    assert a.shape == (64, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, calibration_set(train, 64, 4))
    assert abs(a.mean().item()) < 0.3  # normalized


def _tiny_tarball(path, sizes=((8, 8),)):
    with tarfile.open(path, "w:gz") as tar:
        for split, n in (("train", 6), ("test", 2)):
            for cls in ("cat", "dog"):
                for i in range(n):
                    h, w = sizes[i % len(sizes)]
                    buf = io.BytesIO()
                    Image.new("RGB", (w, h), (40,) * 3 if cls == "cat" else (200,) * 3).save(buf, "JPEG", quality=95)
                    data = buf.getvalue()
                    info = tarfile.TarInfo(f"pets/{split}/{cls}/{i:04d}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_imagefolder_tarball(tmp_path):
    path = tmp_path / "pets.tar.gz"
    _tiny_tarball(path, sizes=((8, 8), (10, 12)))
    train = load_dataset(str(path), True)
    test = load_dataset(str(path), False)
    assert train.images.shape == (12, 3, 8, 8) and len(test) == 4  # all served at the first image's size
    assert train.labels.tolist() == [0] * 6 + [1] * 6
    assert train.images[0].float().mean() < 80 and train.images[-1].float().mean() > 160
    assert load_dataset(str(path), True).images.shape == (12, 3, 8, 8)  # second time from the cache


def test_offline_error_message(tmp_path, monkeypatch):
    import torchvision

    def no_network(*a, **k):
        raise RuntimeError("Dataset not found or corrupted. network unreachable")

    monkeypatch.setattr(torchvision.datasets, "MNIST", no_network)
    with pytest.raises(UserError, match=r"mnist not found under .* Put the files at .*MNIST/raw"):
        load_dataset("mnist", True, tmp_path)
    with pytest.raises(UserError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", True, tmp_path)


def test_training_lowers_loss_and_round_trips(data_dir, tmp_path):
    train = load_dataset("mnist", True, data_dir)
    test = load_dataset("mnist", False, data_dir)
    small_train = ImageSet(train.images[:2048], train.labels[:2048], train.mean, train.std, train.source)
    small_test = ImageSet(test.images[:500], test.labels[:500], test.mean, test.std, test.source)
    model = create_model("mnist_cnn")
    before = evaluate(model, small_test, progress=False)
    res = train_model(model, small_train, small_test, TrainConfig(epochs=1, batch_size=64, lr=0.05), progress=False)
    assert res["history"][0]["train_loss"] < 2.0 and res["test_acc"] > max(before, 0.5)
    torch.save(res["state_dict"], tmp_path / "m.pt")
    again = create_model("mnist_cnn")
    again.load_state_dict(load_state_dict(tmp_path / "m.pt"))
    assert evaluate(again, small_test, progress=False) == res["test_acc"]
