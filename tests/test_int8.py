"""INT8 models for ONNX Runtime: `export --int8`, the `onnxruntime-int8` runtime and `latency --also`."""
import json

import pytest
import torch
from torch import nn

from cnn_sparsegpt.commands.cli import main
from cnn_sparsegpt.deploy.int8 import quantize_int8, zeros_kept
from cnn_sparsegpt.deploy.onnx_file import write_onnx

from .test_cli import mnist_ckpt, prune_args  # noqa: F401  (fixture)

ort = pytest.importorskip("onnxruntime")


def _sparse_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        w = net[2].weight  # 2:4 along input channels, and one small weight that must round to zero
        w.mul_((torch.arange(16) % 4 < 2).float()[None, :, None, None])
        w[0, 0, 0, 0] = 1e-6
    return net


def test_int8_model_keeps_zeros_and_follows_the_float_one(tmp_path):
    net = _sparse_net()
    x = torch.randn(64, 3, 16, 16)
    float_path = write_onnx(net, x[:1], tmp_path / "f.onnx")
    out = quantize_int8(float_path, tmp_path / "q.onnx", x)
    assert out["int8_zeros_kept"] and out["int8_new_zero_weights"] >= 1  # the 1e-6 weight
    assert out["int8_calibration_images"] == 64
    assert zeros_kept(float_path, tmp_path / "q.onnx") == (True, out["int8_new_zero_weights"])
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        want = net(x)
    assert float((got - want).norm() / want.norm()) < 0.05  # 8-bit rounding, not a different function
    kinds = {n.op_type for n in __import__("onnx").load(str(tmp_path / "q.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= kinds  # QDQ, for ORT to fuse into integer kernels


def test_export_int8_command(mnist_ckpt, data_dir, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert main(prune_args(mnist_ckpt, data_dir, run, "--nm", "2:4")) == 0
    capsys.readouterr()
    assert main(["-q", "export", str(run), "--int8", str(tmp_path / "q.onnx"), "--data-dir", str(data_dir)]) == 0
    printed = capsys.readouterr().out
    assert "INT8, minmax ranges from 64 calibration images; zeros kept; top-1" in printed
    out = json.loads((tmp_path / "q.export.json").read_text())
    report = json.loads((run / "report.json").read_text())
    assert out["int8_calibration_is_the_runs"] and out["int8_zeros_kept"]
    assert out["int8_eval_images"] == report["eval_samples"] == 200 and out["int8_eval_split"] == "test"
    assert out["float_top1"] == pytest.approx(report["pruned_acc"], abs=0.011)  # folded, ONNX: the same model
    assert abs(out["int8_top1"] - out["float_top1"]) <= 0.05
    # fewer calibration images and no evaluation; the float ONNX written beside it is the one quantized
    assert main(["-q", "export", str(run), "--onnx", str(tmp_path / "f.onnx"), "--int8", str(tmp_path / "q2.onnx"),
                 "--data-dir", str(data_dir), "--int8-samples", "16", "--eval-samples", "0"]) == 0
    out = json.loads((tmp_path / "f.export.json").read_text())
    assert out["int8_calibration_images"] == 16 and not out["int8_calibration_is_the_runs"]
    assert "int8_top1" not in out and out["onnx_max_abs_diff"] <= 1e-4
    assert "not the run's own" in capsys.readouterr().out


def test_export_int8_errors(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    from cnn_sparsegpt import create_model
    torch.save(create_model("mnist_cnn").state_dict(), run / "model.pt")
    (run / "report.json").write_text(json.dumps({"model": "mnist_cnn", "dataset": "mnist"}))  # no data recorded
    assert main(["export", str(run), "--int8", str(tmp_path / "q.onnx")]) == 2
    assert "does not record its data" in capsys.readouterr().err
    assert main(["export", str(run), "--int8", str(tmp_path / "q.onnx"), "--int8-samples", "0"]) == 2
    assert "--int8-samples must be at least 1" in capsys.readouterr().err


def test_latency_also_times_int8_side_by_side(mnist_ckpt, data_dir, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert main(prune_args(mnist_ckpt, data_dir, run, "--sparsity", "0.5")) == 0
    out = tmp_path / "lat.json"
    assert main(["-q", "latency", str(run), "--also", "onnxruntime-int8", "--batch-sizes", "1", "--warmup", "0",
                 "--runs", "2", "--rounds", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["runtime"] == "onnxruntime" and r["also"] == ["onnxruntime-int8"]
    row = r["rows"][0]
    also = row["also"]["onnxruntime-int8"]
    assert also["dense_s"] > 0 and also["pruned_s"] > 0
    assert also["pruned_speedup"] == pytest.approx(row["dense_s"] / also["pruned_s"])
    assert set(row["calls"]) == {"dense", "pruned", "onnxruntime-int8 dense", "onnxruntime-int8 pruned"}
    assert "onnxruntime-int8: dense" in capsys.readouterr().out
    assert main(["latency", str(run), "--also", "nothing"]) == 2
    assert "unknown runtime 'nothing'" in capsys.readouterr().err


def test_latency_top1_on_every_runtime(mnist_ckpt, data_dir, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert main(prune_args(mnist_ckpt, data_dir, run, "--nm", "2:4")) == 0
    report = json.loads((run / "report.json").read_text())
    out = tmp_path / "lat.json"
    capsys.readouterr()
    assert main(["-q", "latency", str(run), "--also", "onnxruntime-int8", "--also", "torch", "--batch-sizes", "1",
                 "--warmup", "0", "--runs", "1", "--rounds", "1", "--out", str(out), "--top1", "--data-dir",
                 str(data_dir)]) == 0
    r = json.loads(out.read_text())
    assert set(r["top1"]) == {"onnxruntime", "onnxruntime-int8", "torch"}
    assert r["eval_images"] == report["eval_samples"] == 200 and r["eval_split"] == "test"
    assert r["torch_top1"] == {"dense": report["dense_acc"], "pruned": report["pruned_acc"]}
    for which in ("dense", "pruned"):  # folded, ONNX or eager: the model prune measured, up to a borderline image
        for name in ("onnxruntime", "torch"):
            assert r["top1"][name][which] == pytest.approx(r["torch_top1"][which], abs=0.011)
        # INT8 calibrated on the run's own images: 8-bit rounding, not random ranges
        assert abs(r["top1"]["onnxruntime-int8"][which] - r["torch_top1"][which]) <= 0.05
    assert r["int8_calibration_is_the_runs"] and r["int8_calibration_images"] == report["nsamples"]
    printed = capsys.readouterr().out
    assert "top-1 on 200 test images" in printed and "onnxruntime-int8: dense" in printed
    assert "PyTorch (prune's): dense" in printed
    # a subset of the images: prune's figures are of others, so they are not shown; no INT8, no calibration fields
    assert main(["-q", "latency", str(run), "--batch-sizes", "1", "--warmup", "0", "--runs", "1", "--rounds", "1",
                 "--out", str(out), "--top1", "--data-dir", str(data_dir), "--eval-samples", "50"]) == 0
    r = json.loads(out.read_text())
    assert r["eval_images"] == 50 and set(r["top1"]) == {"onnxruntime"}
    assert "torch_top1" not in r and "int8_calibration_images" not in r
    # without --top1 nothing is read or measured; bad values are one line before any work
    assert main(["-q", "latency", str(run), "--batch-sizes", "1", "--warmup", "0", "--runs", "1", "--rounds", "1",
                 "--out", str(out)]) == 0
    assert "top1" not in json.loads(out.read_text())
    assert main(["latency", str(run), "--top1", "--eval-samples", "-1"]) == 2
    assert "--eval-samples must be at least 0" in capsys.readouterr().err
    assert main(["latency", str(run), "--eval-samples", "5"]) == 2  # without --top1 it changed nothing
    assert "--eval-samples applies with --top1 only" in capsys.readouterr().err
    assert main(["export", str(run), "--onnx", str(tmp_path / "m.onnx"), "--int8-samples", "5"]) == 2
    assert "--int8-samples applies with --int8 PATH only" in capsys.readouterr().err
