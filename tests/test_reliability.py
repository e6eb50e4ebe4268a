"""Bad input gets one clear line and exit status 2; checkpoints cannot run code; writes are atomic."""
import os
import random
import pickle

import pytest
import torch
import cnn_sparsegpt as cs
import yaml

from cnn_sparsegpt import create_model, load_state_dict
from cnn_sparsegpt.commands.cli import main
from cnn_sparsegpt.utils import atomic_save, atomic_write_text

from .test_cli import mnist_ckpt, prune_args


def run(capsys, args):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def assert_error(capsys, args, *fragments):
    code, err = run(capsys, args)
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("flags,fragment", [
    (["--nm", "4:4"], "1 <= N < M"), (["--nm", "3:2"], "1 <= N < M"), (["--nm", "1:0"], "1 <= N < M"),
    (["--nm", "2.0:4"], "two integers"), (["--nm", "two:four"], "two integers"),
    (["--sparsity", "1.0"], "[0, 1)"), (["--sparsity", "-0.2"], "[0, 1)"),
    (["--sparsity", "0.5", "--nm", "2:4"], "exactly one"), ([], "exactly one"),
    (["--sparsity", "0.5", "--method", "obs"], "unknown method 'obs'; choose from sparsegpt, magnitude, wanda"),
    (["--sparsity", "0.5", "--device", "cuda"], "no CUDA GPU"),
    (["--sparsity", "0.5", "--device", "tpu"], "unknown device"),
    (["--sparsity", "0.5", "--device", "mps"], "no Apple MPS device"),
    (["--sparsity", "0.5", "--nsamples", "0"], "nsamples must be at least 1"),
    (["--sparsity", "0.5", "--ignore", "conv[1"], "'conv[1' is not a layer name or regular expression"),
])
def test_bad_pattern_method_device(capsys, tmp_path, flags, fragment):
    if "cuda" in flags and torch.cuda.is_available() or "mps" in flags and torch.backends.mps.is_available():
        pytest.skip("this machine has the device")
    assert_error(capsys, ["prune", "--model", "mnist_cnn", "--out", str(tmp_path), *flags], fragment)


def test_prune_refuses_mps():
    """The Hessian sums are float64, which MPS lacks: said before any work (train and finetune may use it)."""
    from cnn_sparsegpt.pruning.config import PruneConfig
    from cnn_sparsegpt.utils import UserError
    with pytest.raises(UserError, match="float64"):
        PruneConfig(nm="2:4").check_runnable(False, torch.device("mps"))


def test_model_that_cannot_run_on_the_data(capsys, tmp_path):
    """A model built for other inputs (MNIST's one channel, RGB images given) stops in one line before calibration,
    with --evaluate or without (was the model's RuntimeError traceback)."""
    torch.save({"train": torch.rand(8, 3, 28, 28), "train_labels": torch.arange(8) % 2}, tmp_path / "rgb.pt")
    for more in ([], ["--no-evaluate"]):
        assert_error(capsys, ["prune", "--model", "mnist_cnn", "--dataset", str(tmp_path / "rgb.pt"), "--nm", "2:4",
                              "--out", str(tmp_path / "o"), *more],
                     "the model cannot run on the dataset's inputs (a batch of shape [2, 3, 28, 28]): RuntimeError",
                     "--image-size")


def test_prune_model_keyword_typo_and_no_parameters():
    from cnn_sparsegpt import prune_model
    from cnn_sparsegpt.utils import UserError
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    with pytest.raises(TypeError, match="unknown keyword 'nmm'.*did you mean 'nm'"):
        prune_model(net, torch.randn(2, 3, 8, 8), nmm="2:4")
    with pytest.raises(UserError, match="ReLU has no parameters"):
        prune_model(torch.nn.ReLU(), torch.randn(2, 3, 8, 8), nm="2:4")
    for run in (lambda x: prune_model(net, x, nm="2:4"), lambda x: prune_model(net, x, structure="channels",
                                                                              keep_macs=0.5),
                lambda x: cs.channel_plan(net, x)):  # images of one channel for a model of three
        with pytest.raises(UserError, match=r"cannot run on the calibration inputs \(shape \[1, 1, 8, 8\]\)"):
            run(torch.randn(2, 1, 8, 8))


def test_api_arguments_users_get_wrong(tmp_path):
    """evaluate on images without labels, save_compressed given the module, export_model given a batch or a shape
    with the batch in it."""
    from cnn_sparsegpt.utils import UserError
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 36, 3)).eval()
    x = torch.randn(6, 3, 8, 8)
    y = net(x).argmax(1)
    with pytest.raises(UserError, match="evaluate needs labels"):
        cs.evaluate(net, x, progress=False)
    assert cs.evaluate(net, (x, y), progress=False, batch_size=4) == 1.0
    assert cs.save_compressed(net, tmp_path / "net.csp")["bytes"] > 0
    with pytest.raises(UserError, match=r"shape \[4, 1, 3, 8, 8\].*without the batch"):
        cs.export_model(net, (1, 3, 8, 8), safetensors=tmp_path / "a.safetensors", progress=False)
    assert cs.export_model(net, x, safetensors=tmp_path / "b.safetensors", progress=False)["input_shape"] == [3, 8, 8]


def test_unknown_model_and_dataset(capsys, tmp_path):
    assert_error(capsys, ["prune", "--model", "resnet99", "--sparsity", "0.5", "--out", str(tmp_path)],
                 "unknown model 'resnet99'", "mnist_cnn", "resnet18_cifar")
    assert_error(capsys, ["prune", "--model", "mnist_cnn", "--dataset", "svhn", "--sparsity", "0.5",
                          "--out", str(tmp_path)], "unknown dataset 'svhn'", "mnist, cifar10")


def test_checkpoint_problems(capsys, tmp_path, data_dir, mnist_ckpt):
    base = ["prune", "--model", "mnist_cnn", "--data-dir", str(data_dir), "--sparsity", "0.5",
            "--out", str(tmp_path / "o"), "--weights"]
    assert_error(capsys, base + [str(tmp_path / "nope.pt")], "checkpoint not found")
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(mnist_ckpt.read_bytes()[:5000])
    assert_error(capsys, base + [str(truncated)], "truncated or corrupt")
    corrupt = tmp_path / "corrupt.pt"
    for seed in (0, 2, 20):  # random bytes; 2 and 20 failed inside the unpickler with IndexError and KeyError
        corrupt.write_bytes(random.Random(seed).randbytes(3000))
        assert_error(capsys, base + [str(corrupt)], "cannot read checkpoint")
    other = tmp_path / "resnet.pt"
    torch.save(create_model("cifar_cnn").state_dict(), other)
    assert_error(capsys, base + [str(other)], "does not fit model 'mnist_cnn'", "missing keys", "unexpected keys")
    no_data = ["prune", "--model", "mnist_cnn", "--data-dir", str(tmp_path), "--nm", "2:4", "--weights", str(other)]
    assert_error(capsys, no_data, "does not fit model 'mnist_cnn'")  # before the data are looked for
    wrong_classes = tmp_path / "wc.pt"
    torch.save(create_model("mnist_cnn", num_classes=7).state_dict(), wrong_classes)
    assert_error(capsys, base + [str(wrong_classes)], "head has 7 outputs but mnist has 10 classes")
    nan = tmp_path / "nan.pt"
    state = create_model("mnist_cnn").state_dict()
    state["2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, nan)
    assert_error(capsys, base + [str(nan)], "NaN or Inf", "2.weight")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # creates a file if ever unpickled


def test_checkpoint_that_would_run_code_is_refused(capsys, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "payload": _Evil(str(marker))}, evil, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    assert_error(capsys, ["prune", "--model", "mnist_cnn", "--weights", str(evil), "--sparsity", "0.5",
                          "--out", str(tmp_path / "o")], "refused to load", "could run code")
    assert not marker.exists()


@pytest.mark.skipif(not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"), reason="torch < 2.6")
def test_pickled_objects_beside_the_tensors_are_read_without_running_them(tmp_path):
    """timm's training checkpoints pickle an argparse.Namespace beside the weights, and many scripts save the whole
    model (torch.save(model)): the tensors are read through inert stand-ins, no class of the file is imported or
    run, and a whole module's parameters and buffers become its state_dict (as state_dict() names them)."""
    import argparse

    model = create_model("resnet20_cifar")
    model.layer1[0].register_buffer("scratch", torch.ones(1), persistent=False)  # not in a state_dict
    state = model.state_dict()
    marker = tmp_path / "pwned"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1), "epoch": 3, "hook": _Evil(str(marker))},
               tmp_path / "timm.pth.tar")
    torch.save(model, tmp_path / "whole.pt")
    torch.save({"model": model, "epoch": 1}, tmp_path / "whole_in_dict.pt")
    for name, said in (("timm.pth.tar", "beside its tensors"), ("whole.pt", "a whole pickled model"),
                       ("whole_in_dict.pt", "a whole pickled model")):
        with pytest.warns(RuntimeWarning, match=said):
            loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    assert not marker.exists()


def test_api_given_the_wrong_thing():
    """A state dict where a module goes, labels that do not fit, masks or a spec missing, NaN inputs or weights: one
    UserError each (were AttributeErrors, a RuntimeError and a failed Cholesky factorization)."""
    from cnn_sparsegpt.utils import UserError
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 36, 3)).eval()
    x, state = torch.randn(6, 3, 8, 8), net.state_dict()
    slip = "must be an nn.Module, got OrderedDict .a state_dict"
    for call in (lambda: cs.export_model(state, (3, 8, 8), progress=False), lambda: cs.compare_latency(net, state,
                 (3, 8, 8)), lambda: cs.evaluate(state, (x, torch.zeros(6).long()), progress=False),
                 lambda: cs.output_error(net, state, x, progress=False)):
        with pytest.raises(UserError, match=slip):
            call()
    with pytest.raises(UserError, match="6 images and 2 labels"):
        cs.evaluate(net, (x, torch.zeros(2).long()), progress=False)
    with pytest.raises(UserError, match="masks must be a dict"):
        cs.keep_masks(net, None)
    with pytest.raises(UserError, match="spec must be the dict"):
        cs.apply_structure(net, None)
    with pytest.raises(UserError, match="example must be a tensor"):
        cs.channel_plan(net, [x])
    with pytest.raises(UserError, match="calibration inputs hold NaN"):
        cs.prune_model(net, torch.full_like(x, float("nan")), nm="2:4", progress=False)
    with torch.no_grad():
        net[3].weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="outputs on the calibration inputs are not finite"):
        cs.prune_model(net, x, nm="2:4", progress=False)


def test_torchscript_models_and_archives(tmp_path):
    """A TorchScript module cannot be pruned (its convs are compiled code: no layer would be found, the report empty):
    one line naming what to give instead; its archive (torch.jit.save) still gives its weights to the Python module."""
    from cnn_sparsegpt.utils import UserError
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 36, 3)).eval()
    x = torch.randn(4, 3, 8, 8)
    traced = torch.jit.trace(net, x)
    for run in (lambda m: cs.prune_model(m, x, nm="2:4"), lambda m: cs.channel_plan(m, x)):
        with pytest.raises(UserError, match="TorchScript module .* cannot be pruned.*Prune the nn.Module"):
            run(traced)
    with pytest.raises(UserError, match="must be an nn.Module, got OrderedDict .a state_dict"):
        cs.prune_model(net.state_dict(), x, nm="2:4")
    with pytest.warns(RuntimeWarning, match="the model has no Conv or Linear layer"):
        cs.prune_model(torch.nn.Sequential(torch.nn.BatchNorm2d(3)).eval(), x, nm="2:4", progress=False)
    torch.jit.save(traced, tmp_path / "traced.pt")
    with pytest.warns(RuntimeWarning, match="TorchScript archive"):
        loaded = load_state_dict(tmp_path / "traced.pt", model=net)
    assert loaded.keys() == net.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("content,fragment", [
    ({"model": "mnist_cnn", "sparsity": 0.5, "nsampels": 10}, "unknown key 'nsampels'"),
    ({"model": "mnist_cnn", "sparsity": 0.5, "nsamples": "many"}, "'nsamples' must be int"),
    ({"model": "mnist_cnn", "sparsity": 0.5, "bn_recalibration": "yes"}, "'bn_recalibration' must be bool"),
    ("model: [unclosed", "not valid YAML"),
])
def test_bad_yaml(capsys, tmp_path, content, fragment):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    assert_error(capsys, ["prune", "--config", str(cfg)], fragment)


def test_missing_data_no_network(capsys, tmp_path, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise RuntimeError("Dataset not found. You can use download=True to download it")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    assert_error(capsys, ["prune", "--model", "mnist_cnn", "--data-dir", str(tmp_path / "empty"),
                          "--sparsity", "0.5", "--out", str(tmp_path / "o")],
                 "mnist not found under", "MNIST/raw")


def test_unwritable_output(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_error(capsys, ["prune", "--model", "mnist_cnn", "--sparsity", "0.5", "--out", str(blocker / "sub")],
                 "not writable")


def test_fewer_calibration_images_than_asked_warns(capsys, tmp_path):
    from .test_models_data import _tiny_tarball

    tar = tmp_path / "pets.tar.gz"
    _tiny_tarball(tar)
    code, err = run(capsys, ["-q", "prune", "--model", "torchvision:mobilenet_v3_small", "--dataset", str(tar),
                             "--nsamples", "100", "--sparsity", "0.5", "--method", "magnitude",
                             "--out", str(tmp_path / "o")])
    assert code == 0, err
    assert "warning: asked for 100 calibration images but only 12 exist; using all of them" in err
    assert "warning: no --weights given" in err


def test_nm_impossible_layer_is_skipped_and_listed(capsys, tmp_path, data_dir, mnist_ckpt):
    code, err = run(capsys, prune_args(mnist_ckpt, data_dir, tmp_path / "o", "--nm", "2:4", "--prune-all"))
    assert code == 0, err
    import json

    layers = {x["name"]: x for x in json.loads((tmp_path / "o" / "report.json").read_text())["layers"]}
    assert layers["0"]["skipped"] and "not divisible by M=4" in layers["0"]["reason"]


def test_atomic_writes_keep_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    atomic_save({"a": torch.ones(2)}, path)
    assert oct(path.stat().st_mode & 0o777) != oct(0o600) or os.umask(0o022) == 0o077

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left behind
    atomic_write_text("x", tmp_path / "r.json")
    assert (tmp_path / "r.json").read_text() == "x"


def test_no_nan_reaches_a_checkpoint(capsys, tmp_path, data_dir, mnist_ckpt, monkeypatch):
    import cnn_sparsegpt.commands.pipeline as pipeline

    real = pipeline.prune_model

    def poisoned(model, *a, **k):
        rep = real(model, *a, **k)
        with torch.no_grad():
            model[2].weight[0, 0, 0, 0] = float("nan")
        return rep

    monkeypatch.setattr(pipeline, "prune_model", poisoned)
    out = tmp_path / "o"
    assert_error(capsys, prune_args(mnist_ckpt, data_dir, out, "--sparsity", "0.5"), "pruned model has NaN")
    assert not (out / "model.pt").exists()


def _jpeg_folder(root, truncated: str | None = None):
    """An ImageFolder with 2 classes of 3 images per split; `truncated`: 'val' cuts one of its JPEGs short."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                px = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(root / split / cls / f"{i}.jpg", quality=90)
    if truncated:
        bad = root / truncated / "b" / "1.jpg"
        bad.write_bytes(bad.read_bytes()[:300])
    return root


def test_truncated_jpeg_in_a_decoded_folder(capsys, tmp_path):
    folder = _jpeg_folder(tmp_path / "imgs", truncated="val")
    assert_error(capsys, ["-q", "prune", "--model", "torchvision:mobilenet_v3_small", "--dataset", str(folder),
                          "--streaming", "off", "--sparsity", "0.5", "--out", str(tmp_path / "o")],
                 "cannot read image", "val/b/1.jpg")


@pytest.fixture
def pruned_run(tmp_path, data_dir, mnist_ckpt):
    out = tmp_path / "run"
    assert main(prune_args(mnist_ckpt, data_dir, out, "--sparsity", "0.5", "--recipe", "published",
                           "--nsamples", "16")) == 0
    return out


def test_run_folder_readers_give_one_line_errors(capsys, tmp_path, pruned_run):
    masks = pruned_run / "masks.pt"
    masks.write_bytes(masks.read_bytes()[:200])
    assert_error(capsys, ["finetune", str(pruned_run), "--max-steps", "1"], "cannot read mask file", "truncated")
    report = pruned_run / "report.json"
    report.write_text(report.read_text()[:100])
    assert_error(capsys, ["export", str(pruned_run), "--safetensors", str(tmp_path / "m.safetensors")],
                 "report.json is not valid JSON")
    assert_error(capsys, ["export", str(tmp_path / "nowhere"), "--safetensors", str(tmp_path / "m.safetensors")],
                 "run folder not found")


def test_finetune_arguments_are_checked_first(capsys, pruned_run):
    assert_error(capsys, ["finetune", str(pruned_run), "--lr", "-1"], "--lr must be positive, got -1")
    assert_error(capsys, ["finetune", str(pruned_run), "--batch-size", "0"], "--batch-size must be at least 1")
    assert_error(capsys, ["finetune", str(pruned_run), "--holdout", "-5"], "--holdout must be >= 0")


def test_export_to_a_folder_that_cannot_be_made(capsys, tmp_path, pruned_run, monkeypatch):
    import cnn_sparsegpt.commands.export as export

    monkeypatch.setattr(export, "load_run", lambda *a: pytest.fail("work before the output path was checked"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_error(capsys, ["export", str(pruned_run), "--onnx", str(blocker / "x" / "y.onnx")], "not writable")


def test_unsupported_combination_fails_before_any_work(capsys, tmp_path, data_dir, mnist_ckpt, monkeypatch):
    import cnn_sparsegpt.commands.pipeline as pipeline

    monkeypatch.setattr(pipeline, "prepare", lambda *a: pytest.fail("data loaded before the options were checked"))
    assert_error(capsys, prune_args(mnist_ckpt, data_dir, tmp_path / "o", "--nm", "2:4", "--allocation", "dp"),
                 "N:M is uniform")
