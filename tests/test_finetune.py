"""Fine-tuning that keeps the masks: the train loop with masks, and `cnn-sparsegpt finetune`."""
import importlib.util
import json

import pytest
import torch

from cnn_sparsegpt import PUBLISHED, create_model, keep_masks, load_dataset, prune_model
from cnn_sparsegpt.commands.cli import main
from cnn_sparsegpt.commands.train import OPTIMIZERS, TrainConfig, train_model
from cnn_sparsegpt.utils import UserError

from .test_cli import mnist_ckpt, prune_args  # noqa: F401  (fixture)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_pruned_weights_stay_zero_at_every_step(data_dir, optimizer):
    torch.manual_seed(0)
    model = create_model("mnist_cnn")
    masks = {n: torch.rand_like(p) > 0.9 for n, p in model.named_parameters() if p.ndim > 1}
    params = dict(model.named_parameters())
    seen = []

    def check(_m, _inp):  # every forward after the first follows an optimizer step
        seen.append(all(bool((params[n][~m] == 0).all()) for n, m in masks.items()))

    model.register_forward_pre_hook(check)
    train = load_dataset("mnist", True, data_dir)
    train = train.subset(torch.arange(512))
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05 if optimizer == "sgd" else 1e-3, schedule="cosine",
                      optimizer=optimizer)
    before = {n: p.detach().clone() for n, p in params.items()}
    train_model(model, train, train.subset(torch.arange(64)), cfg, "cpu", progress=False, masks=masks)
    assert len(seen) >= 8 and all(seen)
    assert all(not torch.equal(before[n][m], params[n][m]) for n, m in masks.items())  # the kept weights moved
    with pytest.raises(UserError, match="unknown optimizer 'lion'"):
        train_model(model, train, train, TrainConfig(optimizer="lion"), "cpu", progress=False)


def test_finetune_run_takes_the_commands_defaults():
    """cs.finetune_run(run) trains as `cnn-sparsegpt finetune RUN` does: one set of defaults (FINETUNE)."""
    import inspect
    from dataclasses import replace

    from cnn_sparsegpt import finetune_run
    from cnn_sparsegpt.commands.cli import build_parser
    from cnn_sparsegpt.commands.train import FINETUNE

    args = build_parser().parse_args(["finetune", "RUN"])
    flags = replace(FINETUNE, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer,
                    max_steps=args.max_steps, warmup=args.warmup, distill=args.distill, temperature=args.temperature)
    defaults = inspect.signature(finetune_run).parameters
    assert defaults["cfg"].default == flags and defaults["dropout"].default == args.dropout
    assert (FINETUNE.optimizer, FINETUNE.lr, FINETUNE.schedule) == ("auto", None, "cosine")


def test_keep_masks_in_your_own_training_loop():
    """A pruned model fine-tuned by the user's own loop (SGD with momentum and weight decay, which would revive
    zeros): the pruned weights are zero after every step while the hook is on, and move once it is removed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(288, 4))
    report = prune_model(model, torch.randn(64, 3, 8, 8), PUBLISHED, nm="2:4", progress=False)
    assert list(report.masks) == ["2.weight"]  # the first and the last layer stay dense
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    kept = keep_masks(model, report.masks, opt)
    params = dict(model.named_parameters())

    def step():
        opt.zero_grad()
        model(torch.randn(16, 3, 8, 8)).square().mean().backward()
        opt.step()
    for _ in range(3):
        step()
        assert all(bool((params[n][~m] == 0).all()) for n, m in report.masks.items())
    kept.remove()
    step()
    assert any(bool((params[n][~m] != 0).any()) for n, m in report.masks.items())
    kept.apply()
    assert all(bool((params[n][~m] == 0).all()) for n, m in report.masks.items())
    with pytest.raises(UserError, match="names no parameter"):
        keep_masks(model, {"fc.weight": torch.ones(4, 288, dtype=torch.bool)})
    with pytest.raises(UserError, match="has shape"):
        keep_masks(model, {"5.weight": torch.ones(4, 2, dtype=torch.bool)})


def test_finetune_command(mnist_ckpt, data_dir, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert main(prune_args(mnist_ckpt, data_dir, run, "--sparsity", "0.9")) == 0
    capsys.readouterr()
    assert main(["-q", "finetune", str(run), "--data-dir", str(data_dir), "--max-steps", "5",
                 "--batch-size", "32"]) == 0
    assert "masks kept" in capsys.readouterr().out
    report = json.loads((run / "finetune" / "report.json").read_text())
    assert report["finetune"]["epochs"] == 1 and "pruned_acc_before" in report["finetune"]
    assert (report["finetune"]["optimizer"], report["finetune"]["lr"]) == ("sgd", 0.03)  # a classifier's default
    assert "bn_recalibrated" in report["finetune"] and report["finetune"]["resumed_from_epoch"] == 0
    assert not (run / "finetune" / "resume.pt").exists()  # (only while a run of several epochs is under way)
    state, masks = torch.load(run / "finetune" / "model.pt"), torch.load(run / "finetune" / "masks.pt")
    for name, keep in masks.items():
        assert torch.equal(state[name][~keep], torch.zeros(int((~keep).sum())))
    assert main(["finetune", str(tmp_path / "nothing")]) == 2
    if importlib.util.find_spec("onnxruntime"):  # the deployment path: prune -> finetune -> export
        assert main(["-q", "export", str(run / "finetune"), "--onnx", str(tmp_path / "ft.onnx")]) == 0


def test_finetune_quantized_run_stays_on_its_grids(mnist_ckpt, data_dir, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert main(prune_args(mnist_ckpt, data_dir, run, "--nm", "2:4", "--wbits", "4")) == 0
    before = torch.load(run / "model.pt")
    assert main(["-q", "finetune", str(run), "--data-dir", str(data_dir), "--max-steps", "5",
                 "--batch-size", "32", "--lr", "0.5"]) == 0  # large steps: some weights must cross grid points
    assert "weights on their grids" in capsys.readouterr().out
    out = run / "finetune"
    state, masks, quant = (torch.load(out / f) for f in ("model.pt", "masks.pt", "quant.pt"))
    assert set(quant) == set(masks) and not any(".parametrizations." in k for k in state)
    moved = 0
    for name, q in quant.items():
        shape = (-1,) + (1,) * (state[name].ndim - 1)
        scale, zero = q["scale"].reshape(shape), q["zero"].float().reshape(shape)
        assert torch.equal(state[name], scale * (q["codes"].float() - zero))  # the codes rebuild the weights
        assert torch.equal(state[name][~masks[name]], torch.zeros(int((~masks[name]).sum())))
        moved += int((state[name] != before[name]).sum())
    assert moved > 0  # training did move weights (between grid points)


@pytest.mark.slow  # > 6 s on 2 cores
def test_finetune_holdout_picks_on_training_images(mnist_ckpt, data_dir, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert main(prune_args(mnist_ckpt, data_dir, run, "--sparsity", "0.9")) == 0
    capsys.readouterr()
    assert main(["-q", "finetune", str(run), "--data-dir", str(data_dir), "--max-steps", "3", "--batch-size", "32",
                 "--holdout", "500", "--warmup", "0.5", "--out", str(tmp_path / "ft")]) == 0
    assert "held-out (500 training images)" in capsys.readouterr().out
    f = json.loads((tmp_path / "ft" / "report.json").read_text())["finetune"]
    assert f["best_epoch_chosen_on"] == "holdout 500" and f["warmup"] == 0.5 and f["dropout"] == 0.0  # default
    assert 0 <= f["holdout_acc_before"] <= 1 and 0 <= f["holdout_acc"] <= 1
    assert main(["finetune", str(run), "--holdout", "-3"]) == 2
    assert main(["finetune", str(run), "--distill", "0.5", "--teacher", str(tmp_path / "missing.pt")]) == 2
    assert main(["-q", "finetune", str(run), "--data-dir", str(data_dir), "--max-steps", "3", "--batch-size", "32",
                 "--distill", "0.7", "--dropout", "own", "--out", str(tmp_path / "kd")]) == 0  # teacher: the
    f = json.loads((tmp_path / "kd" / "report.json").read_text())["finetune"]  # run's own --weights
    assert f["distill"] == 0.7 and f["temperature"] == 4.0 and f["dropout"] is None
    assert main(["finetune", str(run), "--dropout", "1.5"]) == 2
    assert main(["finetune", str(run), "--warmup", "1.5"]) == 2
    assert main(["finetune", str(run), "--teacher", str(tmp_path / "dense.pt")]) == 2  # without --distill: did
    assert main(["finetune", str(run), "--temperature", "2"]) == 2  # nothing, silently
    assert "give --distill W" in capsys.readouterr().err


def test_cosine_warmup_ramps_then_decays(monkeypatch):
    model = torch.nn.Linear(2, 2)
    seen = []
    opt_step = torch.optim.SGD.step

    def record(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return opt_step(self, *a, **k)

    from cnn_sparsegpt.data.datasets import ImageSet
    data = ImageSet(torch.zeros(40, 1, 1, 2, dtype=torch.uint8), torch.zeros(40, dtype=torch.long), (0.0,), (1.0,),
                    "zeros")
    monkeypatch.setattr(torch.optim.SGD, "step", record)
    train_model(torch.nn.Sequential(torch.nn.Flatten(), model), data, data,
                TrainConfig(epochs=1, batch_size=4, lr=1.0, schedule="cosine", warmup=0.3), progress=False)
    assert len(seen) == 10 and seen[0] < seen[1] < seen[2] <= 1.0  # three ramp steps, then the cosine
    assert seen[3] == 1.0 and all(a >= b for a, b in zip(seen[3:], seen[4:]))


def test_a_diverging_run_stops_with_a_clear_error():

    from cnn_sparsegpt.data.datasets import ImageSet
    from cnn_sparsegpt.utils import UserError

    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 255, (64, 1, 4, 4), dtype=torch.uint8, generator=g),
                    torch.randint(0, 3, (64,), generator=g), (0.5,), (0.25,), "random")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    with pytest.raises(UserError, match="diverged .* lower --lr"):
        train_model(model, data, data, TrainConfig(epochs=3, batch_size=8, lr=1e30, schedule="cosine"),
                    progress=False)


def test_fine_tuning_settings_resolve_auto_by_objective():
    from cnn_sparsegpt.commands.finetune import fine_tuning_settings

    auto = TrainConfig(optimizer="auto", lr=None)
    assert (fine_tuning_settings(auto, False).optimizer, fine_tuning_settings(auto, False).lr) == ("sgd", 0.03)
    assert (fine_tuning_settings(auto, True).optimizer, fine_tuning_settings(auto, True).lr) == ("adamw", 1e-3)
    chosen = fine_tuning_settings(TrainConfig(optimizer="adamw", lr=None), False)
    assert (chosen.optimizer, chosen.lr) == ("adamw", 1e-3)  # an optimizer given: its own default lr
    assert fine_tuning_settings(TrainConfig(optimizer="auto", lr=0.2), True).lr == 0.2
    from cnn_sparsegpt.commands.finetune import finetune_run

    with pytest.raises(UserError, match="--optimizer must be one of auto, sgd, adamw, got lion"):
        finetune_run("no-such-run", TrainConfig(optimizer="lion"))  # before anything is loaded


def test_an_interrupted_training_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    """train_model(resume=FILE) writes its state after every epoch: a run stopped in its second epoch and started
    again with the same file ends as the run that was never stopped (weights, history; the batches' order,
    augmentation and dropout carried over), and the file goes when training ends."""
    import cnn_sparsegpt.commands.train as train_module
    from cnn_sparsegpt import ImageSet

    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (96, 3, 12, 12), dtype=torch.uint8, generator=g),
                    torch.randint(0, 3, (96,), generator=g), (0.5,) * 3, (0.25,) * 3, "random", augment="crop-flip")

    def net():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                   torch.nn.Flatten(), torch.nn.Linear(800, 3))
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05)
    state = tmp_path / "train.resume.pt"
    whole = train_model(net(), data, data, cfg, "cpu", progress=False, resume=state)
    assert not state.exists() and whole["resumed_from"] == 0

    real, calls = train_module.evaluate, []

    def stop_in_epoch_two(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(train_module, "evaluate", stop_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_model(net(), data, data, cfg, "cpu", progress=False, resume=state)
    assert state.exists()
    with pytest.raises(UserError, match="other settings"):
        train_model(net(), data, data, TrainConfig(epochs=3, batch_size=32, lr=0.1), "cpu", progress=False,
                    resume=state)
    again = train_model(net(), data, data, cfg, "cpu", progress=False, resume=state)
    assert again["resumed_from"] == 1 and not state.exists()
    assert [h["test_acc"] for h in again["history"]] == [h["test_acc"] for h in whole["history"]]
    assert all(torch.allclose(again["state_dict"][k], v, atol=1e-6) for k, v in whole["state_dict"].items())


class _RawInTraining(torch.nn.Module):
    """As an Ultralytics YOLO head: raw maps in training, decoded (other shapes) in evaluation."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                                        torch.nn.Dropout(0.5))

    def forward(self, x):
        y = self.conv(x)
        return y if self.training else (y.flatten(1).softmax(1), {"raw": y})


def test_training_towards_outputs_that_training_changes(tmp_path):
    """The teacher answers with its training forward (statistics and dropout as in evaluation) where the student's
    training outputs are not its evaluation ones."""
    from cnn_sparsegpt import ImageSet

    torch.manual_seed(0)
    images = ImageSet((torch.rand(16, 1, 8, 8) * 255).to(torch.uint8), torch.full((16,), -1), (0.5,), (0.5,), "t")
    teacher, student = _RawInTraining().eval(), _RawInTraining()
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        student.conv[0].weight.mul_(0.5)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3, optimizer="adamw")
    r = train_model(student, images, images, cfg, progress=False, teacher=teacher, objective="outputs")
    assert r["history"] and teacher.training and not teacher.conv[1].training and not teacher.conv[2].training
