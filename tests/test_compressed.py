"""Compressed files (`export --compressed`, `load_compressed`): packed bits, every encoding restored bit for bit,
a quantized 2:4 run exported and loaded back, one-line errors."""
import json

import pytest
import torch

from cnn_sparsegpt import PUBLISHED, UserError, create_model, load_compressed, prune_model, save_compressed
from cnn_sparsegpt.commands.cli import main
from cnn_sparsegpt.deploy.compressed import QuantGrid, dequantize, pack_bits, unpack_bits
from cnn_sparsegpt.utils import atomic_save, atomic_write_json

pytest.importorskip("safetensors")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bit patterns (so -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(a.view(torch.int32) if a.dtype == torch.float32 else a, b.view(torch.int32)
                           if b.dtype == torch.float32 else b)
    return torch.equal(a, b)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_bits_round_trip(bits):
    v = torch.randint(0, 2 ** bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(v, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, 1001, bits), v.to(torch.int32))


def test_every_encoding_round_trips_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(0)
    sparse = torch.randn(16, 8, 3, 3, generator=g) * (torch.rand(16, 8, 3, 3, generator=g) < 0.3)
    grid = QuantGrid(torch.rand(16, generator=g) * 0.1 - 0.02, torch.randint(0, 16, (16,), generator=g).to(torch.uint8),
                     4)
    codes = torch.randint(0, 16, (16, 8, 3, 3), generator=g)
    half = torch.where(torch.rand(16, 8, 3, 3, generator=g) < 0.5, codes, grid.zero.long()[:, None, None, None])
    state = {"dense": torch.randn(10, 7, generator=g), "sparse": sparse, "quant": dequantize(codes, grid),
             "quant_sparse": dequantize(half, grid), "count": torch.tensor(7), "half": torch.randn(4).half()}
    grids = {"quant": grid, "quant_sparse": grid}
    sizes = save_compressed(state, tmp_path / "c.safetensors", grids)
    assert set(sizes["encodings"]) == {"dense", "sparse", "quant", "quant_sparse"}
    back = load_compressed(tmp_path / "c.safetensors")
    assert back.keys() == state.keys()
    for k in state:
        assert same_bits(back[k], state[k]), k
    assert not torch.signbit(back["quant_sparse"][back["quant_sparse"] == 0]).any()  # zeros are +0.0


def test_weights_off_their_grid_are_refused(tmp_path):
    grid = QuantGrid(torch.full((2,), 0.1), torch.zeros(2, dtype=torch.uint8), 4)
    with pytest.raises(UserError, match="not on their quantization grid"):
        save_compressed({"w": torch.full((2, 3), 0.123)}, tmp_path / "c.safetensors", {"w": grid})


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    """resnet20_cifar at 2:4 with 4-bit codes (random weights, BatchNorms that do something when folded)."""
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = create_model("resnet20_cifar", num_classes=10).eval()
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.weight.data.uniform_(-2, 2)  # negative factors too
            bn.running_var.uniform_(0.5, 2)
    rep = prune_model(model, torch.randn(64, 3, 32, 32), PUBLISHED, nm="2:4", wbits=4, progress=False)
    atomic_save(model.state_dict(), d / "model.pt")
    atomic_save(rep.masks, d / "masks.pt")
    atomic_save(rep.quantized, d / "quant.pt")
    atomic_write_json({"model": "resnet20_cifar", "dataset": "cifar10", "pattern": "2:4",
                       "input_shape": [3, 32, 32]}, d / "report.json")
    return d


def test_export_compressed_quantized_run(quantized_run, capsys):
    from safetensors.torch import load_file

    d = quantized_run
    assert main(["export", str(d), "--compressed", str(d / "c.safetensors"), "--safetensors",
                 str(d / "f.safetensors")]) == 0
    assert "of the fp32 state dict" in capsys.readouterr().out
    out = json.loads((d / "f.export.json").read_text())  # beside the first of onnx, safetensors, compressed
    sizes = out["sizes"]
    assert sizes["compressed_bytes"] == (d / "c.safetensors").stat().st_size
    assert sizes["compressed_fraction"] < 0.15 and out["quantized_layers"] == len(torch.load(d / "quant.pt")) >= 20
    assert set(sizes["encodings"]) >= {"quant_sparse"}
    exported, restored = load_file(str(d / "f.safetensors")), load_compressed(d / "c.safetensors")
    assert exported.keys() == restored.keys()
    assert all(same_bits(restored[k], exported[k]) for k in exported)
    from cnn_sparsegpt.commands.pipeline import load_run

    model, _, _ = load_run(d)
    folded = load_compressed(d / "c.safetensors", model=create_model("resnet20_cifar", num_classes=10))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_load_compressed_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(UserError, match="not found"):
        load_compressed(tmp_path / "none.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UserError, match="not a cnn-sparsegpt compressed file"):
        load_compressed(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 10)
    with pytest.raises(UserError, match="cannot read compressed file"):
        load_compressed(tmp_path / "junk.safetensors")


def test_files_written_before_library_layers_were_folded_still_load(tmp_path):
    """A compressed file of a timm model written when only torch's own BatchNorms were folded (its BatchNormAct2d
    kept as it was) loads into the same model as it was folded then; a new file gets BatchNormAct2d folded."""
    from timm.layers import BatchNormAct2d
    from torch import nn

    from cnn_sparsegpt.deploy.fold import fold_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)).eval()
    for m in (model[1], model[3]):
        m.running_mean.normal_(0, 0.5), m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 12, 12)
    for library_layers, keys in ((False, {"1.weight", "1.running_var"}), (True, set())):
        state = fold_batchnorm(model, library_layers).state_dict()
        assert keys <= state.keys() and ("1.weight" in state) == bool(keys)
        save_compressed(state, tmp_path / "m.safetensors")
        loaded = load_compressed(tmp_path / "m.safetensors", model=model)
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
