from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
RESNET_CKPT = SHARED / "checkpoints" / "resnet18_cifar10.pt"


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)


@pytest.fixture
def data_dir():
    if not (DATA / "MNIST" / "raw").is_dir():
        pytest.skip("../shared/data/MNIST not present")
    return DATA


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Decoded-image cache shared by the session's tests, never the user's home."""
    monkeypatch.setenv("CNN_SPARSEGPT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
