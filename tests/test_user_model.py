"""A user's own model from the command line: `--model FILE.py:NAME` (a function or class that builds it)."""
import json
import textwrap

import pytest
import torch

from cnn_sparsegpt import UserError, create_model
from cnn_sparsegpt.commands.cli import main
from cnn_sparsegpt.commands.pipeline import load_run
from cnn_sparsegpt.models import check_model_name, model_entry

NET = '''
from dataclasses import dataclass

from torch import nn

from cnn_sparsegpt import register_model


@dataclass
class Widths:  # a dataclass in the file: the module is importable by name while it runs
    hidden: int = 16


class MyNet(nn.Sequential):
    def __init__(self, num_classes=10, widths=Widths()):
        super().__init__(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, widths.hidden, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths.hidden, num_classes))


def fixed_head():
    return MyNet(num_classes=10)


@register_model(dataset="mnist")
def my_registered_net(num_classes=10):
    return MyNet(num_classes)


def not_a_model():
    return 3


class LogitsNet(MyNet):  # returns a mapping with 'logits', as Hugging Face's image classifiers do (ModelOutput)
    def forward(self, x):
        return {"logits": super().forward(x)}


def broken(num_classes=10):
    raise RuntimeError("no such layer")


def wide_net(width, num_classes=10, depth=1):  # a builder that needs an argument the command line must give
    layers = [nn.Conv2d(1, width, 3, padding=1), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
'''


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "my_net.py"
    path.write_text(NET)
    return path


def test_prune_a_model_from_its_file(net_file, data_dir, tmp_path):
    """Built with the data's classes, pruned, and its run folder loads back into the same class."""
    name = f"{net_file}:MyNet"
    torch.manual_seed(0)
    ckpt = tmp_path / "my_net.pt"
    torch.save(create_model(name).state_dict(), ckpt)
    out = tmp_path / "run"
    assert main(["-q", "prune", "--model", name, "--weights", str(ckpt), "--dataset", "mnist", "--data-dir",
                 str(data_dir), "--nsamples", "32", "--eval-samples", "100", "--nm", "2:4", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == name and report["sparsity"] == 0.5
    model, _, masks = load_run(out)
    assert type(model).__name__ == "MyNet" and set(masks) == {"2.weight"}
    assert torch.all(model[2].weight[~masks["2.weight"]] == 0)
    assert main(["-q", "export", str(out), "--compressed", str(out / "c.safetensors")]) == 0  # finds the file again


def test_the_file_is_imported_once_and_a_registered_factory_names_its_dataset(net_file):
    a, b = create_model(f"{net_file}:MyNet", num_classes=3), create_model(f"{net_file}:MyNet", num_classes=5)
    assert type(a) is type(b) and a[-1].out_features == 3 and b[-1].out_features == 5
    assert create_model(f"{net_file}:fixed_head", num_classes=3)[-1].out_features == 10  # no num_classes: as built
    assert model_entry(f"{net_file}:MyNet") is None  # so --dataset is needed
    assert model_entry(f"{net_file}:my_registered_net").dataset == "mnist"


@pytest.mark.parametrize("suffix, message", [
    ("missing.py:MyNet", "model file not found"),
    ("my_net.py:Nope", "has no function or class 'Nope'"),
    ("my_net.py:not_a_model", "returned int, not a torch nn.Module"),
    ("my_net.py:broken", "building the model"),
])
def test_bad_user_models_are_one_line_errors(net_file, suffix, message):
    with pytest.raises(UserError, match=message):
        create_model(f"{net_file.parent}/{suffix}")


def test_a_file_that_fails_to_import_and_a_missing_module(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("import not_a_module_anyone_has\n")
    with pytest.raises(UserError, match="importing .*bad.py failed: ModuleNotFoundError"):
        check_model_name(f"{bad}:Net")
    script = tmp_path / "train.py"
    script.write_text("import sys\nsys.exit(2)\n")  # as argparse does on arguments it does not know
    with pytest.raises(UserError, match="exited .*if __name__ == '__main__'"):
        check_model_name(f"{script}:Net")
    with pytest.raises(UserError, match="cannot import 'not_a_package.models'"):
        check_model_name("not_a_package.models:Net")
    assert main(["-q", "prune", "--model", f"{bad}:Net", "--dataset", "mnist", "--nm", "2:4"]) == 2
    err = capsys.readouterr().err
    assert "importing" in err and "Traceback" not in err


def test_an_unregistered_model_needs_the_dataset(net_file, capsys):
    assert main(["-q", "prune", "--model", f"{net_file}:MyNet", "--nm", "2:4"]) == 2
    assert "--dataset is required" in capsys.readouterr().err


def test_model_kwargs_build_the_model_and_travel_with_the_run(net_file, data_dir, tmp_path, capsys):
    """--model-kwargs reach the builder (values read as Python literals), report.json keeps them, and the commands
    that rebuild the model from a run (export, finetune) use them; prune reads them from the .json `train` wrote."""
    name = f"{net_file}:wide_net"
    model = create_model(name, num_classes=10, kwargs={"width": 16, "depth": 2})
    assert model[2].out_channels == 16 and len(model) == 9
    ckpt = tmp_path / "wide.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "run"
    common = ["--weights", str(ckpt), "--dataset", "mnist", "--data-dir", str(data_dir), "--nsamples", "32",
              "--eval-samples", "100", "--nm", "2:4"]
    assert main(["-q", "prune", "--model", name, "--model-kwargs", "width=16", "depth=2", *common,
                 "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["model_kwargs"] == {"width": 16, "depth": 2}
    assert load_run(out)[0][4].in_channels == 16
    assert main(["-q", "export", str(out), "--compressed", str(out / "c.safetensors")]) == 0
    # without them the builder fails with one line; from the checkpoint's .json (as `train` writes it) they are found
    assert main(["-q", "prune", "--model", name, *common, "--out", str(tmp_path / "r2")]) == 2
    assert "building the model" in capsys.readouterr().err
    trained = tmp_path / "trained.pt"  # `train --model-kwargs` records them beside its checkpoint
    assert main(["-q", "train", "--model", name, "--model-kwargs", "width=16", "depth=2", "--dataset", "mnist",
                 "--data-dir", str(data_dir), "--max-steps", "1", "--epochs", "1", "--out", str(trained)]) == 0
    assert json.loads((tmp_path / "trained.pt.json").read_text())["model_kwargs"] == {"width": 16, "depth": 2}
    (tmp_path / "wide.pt.json").write_text((tmp_path / "trained.pt.json").read_text())
    assert main(["-q", "prune", "--model", name, *common, "--out", str(tmp_path / "r2")]) == 0
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["model_kwargs"] == {"width": 16, "depth": 2}


@pytest.mark.parametrize("args, message", [
    (["--model-kwargs", "width"], "takes KEY=VALUE pairs"),
    (["--model-kwargs", "num_classes=3"], "num_classes comes from the checkpoint's head"),
    (["--model-kwargs", "width=16", "colour=3"], "unexpected keyword argument 'colour'"),
])
def test_bad_model_kwargs_are_one_line_errors(net_file, tmp_path, args, message, capsys):
    try:
        rc = main(["-q", "prune", "--model", f"{net_file}:wide_net", "--dataset", "mnist", "--data-dir",
                   str(tmp_path), "--nm", "2:4", *args])  # no data there: the model fails first
    except SystemExit as e:  # argparse's own error line for a malformed pair
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    with pytest.raises(UserError, match="resnet20_cifar with --model-kwargs colour=3 failed"):
        create_model("resnet20_cifar", kwargs={"colour": 3})


def test_bench_models_take_model_kwargs(net_file, tmp_path):
    from cnn_sparsegpt.commands.bench import load_bench_config

    cfg = tmp_path / "bench.yaml"
    cfg.write_text(f"models:\n  - model: {net_file}:wide_net\n    model_kwargs: {{width: 16, depth: 2}}\n")
    assert load_bench_config(str(cfg)).models[0].model_kwargs == {"width": 16, "depth": 2}


def test_dry_run_lists_the_layers_the_prune_prunes_and_why_the_others_stay(net_file, data_dir, tmp_path, capsys):
    """--dry-run decides what the prune decides (its own code), prints it and writes nothing; a layer's own pattern
    (--layer-patterns) is what that layer gets."""
    name = f"{net_file}:wide_net"
    ckpt = tmp_path / "wide.pt"
    torch.save(create_model(name, num_classes=10, kwargs={"width": 8, "depth": 3}).state_dict(), ckpt)
    common = ["-q", "prune", "--model", name, "--model-kwargs", "width=8", "depth=3", "--weights", str(ckpt),
              "--dataset", "mnist", "--data-dir", str(data_dir), "--nm", "2:4", "--nsamples", "16", "--eval-samples",
              "32", "--ignore", "4", "--layer-patterns", "6=0.75"]
    capsys.readouterr()
    assert main([*common, "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "dry").exists()
    assert main([*common, "--out", str(tmp_path / "run")]) == 0
    layers = json.loads((tmp_path / "run" / "report.json").read_text())["layers"]
    for x in layers:  # the same layers pruned, the same reasons for the others
        line = next(line for line in printed.splitlines() if line.startswith(f"{x['name']} "))
        assert line.endswith(f"stays dense: {x['reason']}" if x["skipped"] else f"prune {x['pattern']}"), line
    assert sorted(x["skipped"] for x in layers) == [False, False, True, True, True]  # first, ignored, last
    by = {x["name"]: x for x in layers}
    assert (by["2"]["pattern"], by["6"]["pattern"]) == ("2:4", "0.75") and abs(by["6"]["sparsity"] - 0.75) < 0.01
    assert "would prune 2 of 5 layers" in printed


def test_a_channel_dry_run_lists_which_channels_may_go_and_why_the_others_stay(net_file, data_dir, tmp_path,
                                                                              capsys):
    """--dry-run with --structure channels: the prune's channel walk, each group's channels, how many may go, and
    why none of a group may (here: the classifier's outputs); nothing written."""
    name = f"{net_file}:wide_net"
    common = ["-q", "prune", "--model", name, "--model-kwargs", "width=8", "depth=3", "--dataset", "mnist",
              "--data-dir", str(data_dir), "--structure", "channels", "--keep-macs", "0.5", "--nsamples", "16"]
    capsys.readouterr()
    assert main([*common, "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "dry").exists()
    from cnn_sparsegpt import channel_plan
    plan = channel_plan(create_model(name, num_classes=10, kwargs={"width": 8, "depth": 3}), torch.randn(1, 1, 28, 28))
    for g in plan:
        line = next(line for line in printed.splitlines() if line.startswith(f"{g['producers'][0]} "))
        assert line.split()[1:3] == [str(g["channels"]), str(g["removable"])]
        assert line.endswith(g["reason"] or "removable")
    assert any(g["reason"] == "reaches the model's output" for g in plan)
    free = [g for g in plan if g["removable"]]
    assert f"{sum(g['removable'] for g in free)} of {sum(g['channels'] for g in plan)} channels in {len(free)} of " \
           f"{len(plan)} groups may be removed" in printed


def test_a_classifier_returning_a_mapping_with_logits_is_measured_trained_and_timed_by_them(net_file, data_dir,
                                                                                          tmp_path):
    """A model whose output is a mapping with 'logits' (Hugging Face's ModelOutput) is a classifier: top-1 on its
    logits in prune, finetune (cross-entropy and distillation) and latency --top1."""
    name = f"{net_file}:LogitsNet"
    ckpt, run = tmp_path / "net.pt", tmp_path / "run"
    torch.save(create_model(name, num_classes=10).state_dict(), ckpt)
    assert main(["-q", "prune", "--model", name, "--weights", str(ckpt), "--dataset", "mnist", "--data-dir",
                 str(data_dir), "--nm", "2:4", "--nsamples", "16", "--eval-samples", "32", "--out", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["metric"] == "top1" and 0 <= report["pruned_acc"] <= 1
    assert main(["-q", "finetune", str(run), "--data-dir", str(data_dir), "--max-steps", "2", "--distill", "0.5"]) == 0
    assert main(["-q", "latency", str(run), "--runtime", "torch", "--batch-sizes", "1", "--runs", "1", "--rounds", "1",
                 "--warmup", "0", "--top1", "--data-dir", str(data_dir), "--eval-samples", "16"]) == 0
    assert set(json.loads((run / "latency.json").read_text())["top1"]) == {"torch"}
