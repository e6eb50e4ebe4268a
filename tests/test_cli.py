"""The command line end to end: prune (flags and YAML), train, bench (resumable), plot."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune
import yaml

from cnn_sparsegpt import create_model
from cnn_sparsegpt.commands.bench import KEY, read_rows
from cnn_sparsegpt.commands.cli import build_parser, main
from cnn_sparsegpt.commands.pipeline import load_run


@pytest.fixture
def mnist_ckpt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "mnist_cnn.pt"
    torch.save(create_model("mnist_cnn").state_dict(), path)
    return path


def prune_args(ckpt, data_dir, out, *extra):
    return ["-q", "prune", "--model", "mnist_cnn", "--weights", str(ckpt), "--data-dir", str(data_dir),
            "--nsamples", "64", "--eval-samples", "200", "--ignore", "6", "--out", str(out), *extra]


def test_prune_end_to_end(mnist_ckpt, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(prune_args(mnist_ckpt, data_dir, out, "--nm", "2:4")) == 0
    printed = capsys.readouterr().out
    assert "sparsity 0.500 of the pruned layers" in printed and "top-1 dense" in printed
    report = json.loads((out / "report.json").read_text())
    for key in ("dense_acc", "pruned_acc", "sparsity", "total_sparsity", "seconds", "nsamples", "method", "pattern"):
        assert key in report
    assert 0 <= report["dense_acc"] <= 1 and 0 <= report["pruned_acc"] <= 1
    assert report["sparsity"] == 0.5 and report["nsamples"] == 64 and report["pattern"] == "2:4"
    layers = {x["name"]: x for x in report["layers"]}
    assert {"name", "shape", "sparsity", "skipped", "reason", "error", "seconds"} <= set(layers["2"])
    assert layers["0"]["skipped"] and layers["6"]["skipped"] and not layers["2"]["skipped"]
    masks = torch.load(out / "masks.pt", weights_only=True)
    assert set(masks) == {"2.weight"}
    model = create_model("mnist_cnn")
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert torch.all(model[2].weight[~masks["2.weight"]] == 0)
    torch.nn.utils.prune.custom_from_mask(model[2], "weight", masks["2.weight"])  # usable as documented


def test_prune_interrupted_while_measuring_leaves_a_usable_run(mnist_ckpt, data_dir, tmp_path, capsys, monkeypatch):
    """The pruned model is written before its evaluation (minutes on a large split): stopped there, the run folder
    holds model.pt, masks.pt and a report that says the measurement is missing, and loads as a run."""
    import cnn_sparsegpt.commands.pipeline as pipeline

    real, calls = pipeline.evaluate, []

    def stop_at_the_second(*args, **kw):  # the dense model's accuracy, then the pruned model's
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(pipeline, "evaluate", stop_at_the_second)
    out = tmp_path / "run"
    assert main(prune_args(mnist_ckpt, data_dir, out, "--nm", "2:4", "--no-reuse-dense")) == 130  # (measured)
    report = json.loads((out / "report.json").read_text())
    assert report["pruned_acc"] is None and "interrupted" in report["evaluation"] and report["sparsity"] == 0.5
    model, _, masks = load_run(out)
    assert torch.all(model[2].weight[~masks["2.weight"]] == 0)
    monkeypatch.setattr(pipeline, "evaluate", real)
    assert main(prune_args(mnist_ckpt, data_dir, out, "--nm", "2:4")) == 0
    assert "evaluation" not in json.loads((out / "report.json").read_text())


def test_prune_interrupted_goes_on_from_its_last_saved_layer(mnist_ckpt, data_dir, tmp_path, capsys, monkeypatch):
    import cnn_sparsegpt.pruning.prune as prune_module

    from .test_prune_resume import stop_after

    real = stop_after(monkeypatch, 1)
    out = tmp_path / "run"
    args = prune_args(mnist_ckpt, data_dir, out, "--nm", "2:4", "--prune-all")
    assert main(args) == 130
    assert "the pruned layers are kept in" in capsys.readouterr().err and (out / "resume.pt").is_file()
    monkeypatch.setattr(prune_module._Pruner, "prune_layer", real)
    assert main(args) == 0 and not (out / "resume.pt").exists()
    assert json.loads((out / "report.json").read_text())["sparsity"] == 0.5


def test_prune_with_permute_saves_the_reordered_network(mnist_ckpt, data_dir, tmp_path, capsys):
    """--permute: the report lists what moved, and model.pt (the new order) loads into a fresh model with its
    masks."""
    out = tmp_path / "perm"
    assert main(prune_args(mnist_ckpt, data_dir, out, "--nm", "2:4", "--permute")) == 0
    assert "channels reordered for 2:4" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["permute"] is True and "permute=True" in report["recipe_label"]
    group = report["permutation"]["groups"][0]
    assert group["producers"] == ["0"] and group["pruned_after"] <= group["pruned_before"]
    masks = torch.load(out / "masks.pt", weights_only=True)
    model = create_model("mnist_cnn")
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert torch.all(model[2].weight[~masks["2.weight"]] == 0)


def test_prune_from_yaml_with_flag_override(mnist_ckpt, data_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": "mnist_cnn", "weights": str(mnist_ckpt), "method": "magnitude",
                                   "nm": "2:4", "nsamples": 32, "ignore": ["6"], "eval_samples": 100,
                                   "low_memory": True, "out": str(tmp_path / "from_yaml")}))
    assert main(["-q", "prune", "--config", str(cfg), "--data-dir", str(data_dir), "--sparsity", "0.7"]) == 0
    report = json.loads((tmp_path / "from_yaml" / "report.json").read_text())
    assert report["method"] == "magnitude" and report["pattern"] == "0.7" and abs(report["sparsity"] - 0.7) < 1e-3
    assert report["config"]["low_memory"] and report["peak_stored_mb"] > 0


def test_shipped_configs_are_valid():
    from cnn_sparsegpt.commands.bench import load_bench_config
    from cnn_sparsegpt.commands.options import PruneOptions, load_yaml

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    names = sorted(os.listdir(root))
    assert any(n.startswith("resnet18") for n in names) and any(n.startswith("bench_") for n in names)
    for name in names:
        path = os.path.join(root, name)
        if name.startswith("bench_"):
            assert load_bench_config(path).models
        else:
            assert PruneOptions.build(load_yaml(path)).model


def test_entry_point_help_and_error():
    out = subprocess.run(["cnn-sparsegpt", "prune", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--nm" in out.stdout and "--percdamp" in out.stdout
    out = subprocess.run(["cnn-sparsegpt", "prune", "--model", "mnist_cnn", "--nm", "4:2"], capture_output=True,
                         text=True)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: --nm 4:2")
    assert "Traceback" not in out.stderr
    parser = build_parser()  # -q before or after the command; not given: progress bars on
    assert parser.parse_args(["bench", "-q", "--config", "c.yaml"]).quiet is True
    assert parser.parse_args(["-q", "bench", "--config", "c.yaml"]).quiet is True
    assert parser.parse_args(["bench", "--config", "c.yaml"]).quiet is False


def test_train_command(data_dir, tmp_path, capsys):
    out = tmp_path / "ck.pt"
    assert main(["-q", "train", "--model", "mnist_cnn", "--data-dir", str(data_dir), "--epochs", "1",
                 "--max-steps", "5", "--out", str(out)]) == 0
    meta = json.loads(out.with_name("ck.pt.json").read_text())
    for key in ("model", "dataset", "normalization", "epochs", "test_acc", "seconds", "torch_version"):
        assert key in meta
    model = create_model("mnist_cnn")
    model.load_state_dict(torch.load(out, weights_only=True))


def _bench_config(tmp_path, ckpt, data_dir, patterns):
    cfg = {"csv": str(tmp_path / "res.csv"), "reports": str(tmp_path / "reports"), "nsamples": [32],
           "data_dir": str(data_dir), "eval_samples": 100,
           "models": [{"model": "mnist_cnn", "weights": str(ckpt), "methods": ["magnitude", "sparsegpt"],
                       "patterns": patterns, "ignore": ["6"]}]}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow  # > 6 s on 2 cores
def test_bench_killed_and_restarted_has_each_row_once(mnist_ckpt, data_dir, tmp_path):
    cfg = _bench_config(tmp_path, mnist_ckpt, data_dir, ["0.5", "2:4", "0.8"])
    cmd = [sys.executable, "-m", "cnn_sparsegpt.commands.cli", "-q", "bench", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    csv_path = tmp_path / "res.csv"
    deadline = time.time() + 120
    while time.time() < deadline and len(read_rows(csv_path)) < 1:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(read_rows(csv_path))
    assert 1 <= partial < 6
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped" in done.stdout
    rows = read_rows(csv_path)
    keys = [tuple(r[k] for k in KEY) for r in rows]
    assert len(rows) == 6 and len(set(keys)) == 6
    assert len({r["dense_acc"] for r in rows}) == 1  # measured once, reused
    r = rows[0]
    assert float(r["pruned_acc"]) <= 1 and r["torch_version"] and r["date"] and float(r["peak_rss_mb"]) > 0


def test_plot_from_csv(mnist_ckpt, data_dir, tmp_path):
    cfg = _bench_config(tmp_path, mnist_ckpt, data_dir, ["0.5", "2:4"])
    assert main(["-q", "bench", "--config", str(cfg)]) == 0
    out = tmp_path / "plots"
    assert main(["plot", "--csv", str(tmp_path / "res.csv"), "--out", str(out)]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["mnist_cnn_0.5_layer_sparsity.png", "mnist_cnn_2of4_layer_errors.png",  # sparsegpt 0.5: dp
                    "mnist_cnn_accuracy_vs_sparsity.png", "nm_bars.png"]
    from cnn_sparsegpt.commands.results import main as results_main

    assert results_main(["--csv", str(tmp_path / "res.csv"), "--out", str(tmp_path / "R.md"),
                         "--plots", str(out)]) == 0
    text = (tmp_path / "R.md").read_text()
    assert "| sparsegpt |" in text and "42.58" in text


def test_file_names_from_model_names():
    from cnn_sparsegpt.utils import file_stem

    assert file_stem("torchvision:resnet50-sparsegpt-2of4") == "torchvision_resnet50-sparsegpt-2of4"
    assert file_stem("models/my net.py:build") == "models_my_net.py_build"


def test_bench_recipes_plots_and_results(mnist_ckpt, data_dir, tmp_path):
    cfg_path = _bench_config(tmp_path, mnist_ckpt, data_dir, ["0.6", "2:4"])
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["recipe"] = "published"
    cfg["recipes"] = [{}, {"allocation": "owl", "owl_lambda": 0.2}, {"stat_correction": True}]
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["-q", "bench", "--config", str(cfg_path)]) == 0
    rows = read_rows(tmp_path / "res.csv")
    # 2 methods x (0.6 with 3 recipes + 2:4 with the 2 uniform ones: N:M takes no allocation)
    assert len(rows) == 2 * (3 + 2)
    assert {r["recipe"] for r in rows} == {"", "allocation=owl,owl_lambda=0.2", "stat_correction=True"}
    out = tmp_path / "plots"
    assert main(["plot", "--csv", str(tmp_path / "res.csv"), "--out", str(out)]) == 0
    assert (out / "mnist_cnn_0.6_layer_sparsity.png").is_file()
    from cnn_sparsegpt.commands.results import main as results_main

    assert results_main(["--csv", str(tmp_path / "res.csv"), "--out", str(tmp_path / "R.md"), "--plots", str(out),
                         "--recipes-csv", str(tmp_path / "res.csv")]) == 0
    text = (tmp_path / "R.md").read_text()
    assert "## Beyond uniform SparseGPT" in text and "| allocation=owl,owl_lambda=0.2 |" in text
    cfg["recipes"] = [{"allocaton": "dp"}]  # a typo is refused before any run
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["-q", "bench", "--config", str(cfg_path)]) == 2


def test_bench_latency_columns_and_speed_plot(mnist_ckpt, data_dir, tmp_path):
    cfg_path = _bench_config(tmp_path, mnist_ckpt, data_dir, ["keep_params=0.5", "0.5"])
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["models"][0]["methods"] = ["sparsegpt"]
    cfg["models"][0]["ignore"] = []  # (an ignored layer keeps its channels: too few would be left to remove)
    cfg["latency"] = "torch"  # eager: the harness, not the runtime, is under test here
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["-q", "bench", "--config", str(cfg_path)]) == 0
    rows = {r["pattern"]: r for r in read_rows(tmp_path / "res.csv")}
    assert float(rows["keep_params=0.5"]["macs_kept"]) < 1 and rows["0.5"]["macs_kept"] == ""
    assert all(float(r["speedup_b1"]) > 0 and float(r["speedup_b32"]) > 0 and r["latency_runtime"] == "torch"
               for r in rows.values())
    report = json.loads(Path(rows["keep_params=0.5"]["report"]).read_text())
    assert [row["batch"] for row in report["latency"]["rows"]] == [1, 32]
    out = tmp_path / "plots"
    assert main(["plot", "--csv", str(tmp_path / "res.csv"), "--out", str(out)]) == 0
    assert (out / "mnist_cnn_accuracy_vs_speedup.png").is_file()
    cfg["latency"] = "tensorflow"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["-q", "bench", "--config", str(cfg_path)]) == 2


def test_seed_and_finetune_tables(tmp_path):
    from cnn_sparsegpt.commands.results import finetune_table, seed_table

    rows = [{"model": "m", "method": "sparsegpt", "pattern": "0.9", "recipe": "", "drop": d} for d in ("0.02", "0.04")]
    assert "| m | sparsegpt | 0.9 | as published | 2 | -3.00 (-4.00, -2.00) |" in seed_table(rows)
    report = {"model": "m", "pattern": "0.9", "recipe": "refine=cg,dense_target=True", "wbits": None,
              "dense_acc": 0.99, "pruned_acc": 0.985, "device": "cpu",
              "finetune": {"pruned_acc_before": 0.9, "epochs": 1, "seconds": 12.3, "lr": 0.01}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    assert "| m | 0.9 | refine=cg,dense_target=True | float | 99.00 | 90.00 | 98.50 | 1 | 0.01 | 12 | cpu |" in \
        finetune_table([path])
    path.write_text(json.dumps(report | {"dense_acc": None}))  # a prune run with --no-evaluate
    assert "| float | – | 90.00 | 98.50 |" in finetune_table([path])


def test_sweep_table_reports_the_setting_chosen_on_held_out_images(tmp_path):
    from cnn_sparsegpt.commands.results import sweep_table

    run = {"model": "m", "pattern": "0.9", "device": "cpu", "seconds": 3.0, "dense_test_acc": 0.8, "commit": "abc",
           "holdout_acc_before": 0.5, "test_acc_before": 0.5}
    sweep = {"epochs": 1, "chosen": {"lr": 0.1, "warmup": 0.0, "test_acc": 0.6},
             "runs": [run | {"lr": 0.01, "warmup": 0.0, "holdout_acc": 0.6, "test_acc": 0.7},
                      run | {"lr": 0.1, "warmup": 0.0, "holdout_acc": 0.7, "test_acc": 0.6}]}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(sweep))
    # a sweep written before the optimizer was swept: SGD's
    assert "| m | 0.9 | 1 | 2 | sgd, 0.1, 0.0, 0.0, 128, own | 50.00 → 70.00 | 50.00 → 60.00 | 80.00 | 3 | cpu | abc |" \
        in sweep_table([path])
    sweep["chosen"]["optimizer"] = sweep["runs"][0]["optimizer"] = "adamw"
    sweep["runs"][0]["lr"] = 0.1  # the same lr with another optimizer: the row is the chosen optimizer's
    path.write_text(json.dumps(sweep))
    assert "| 2 | adamw, 0.1, 0.0, 0.0, 128, own | 50.00 → 60.00 | 50.00 → 70.00 |" in sweep_table([path])


def test_recipe_defaults_and_labels():
    from dataclasses import replace

    from cnn_sparsegpt.commands.options import PruneOptions
    from cnn_sparsegpt.pruning.config import PUBLISHED, RECOMMENDED, recipe_label
    from cnn_sparsegpt.utils import UserError

    default = PruneOptions.build().config.resolved()
    assert default == RECOMMENDED.resolved() and (default.refine, default.dense_target) == ("cg", True)
    assert recipe_label(default) == "solver=auto,refine=cg,dense_target=True,intercept=True"
    assert recipe_label(replace(RECOMMENDED, method="magnitude")) == "refine=cg,dense_target=True,intercept=True"
    # N:M with SparseGPT: permute (auto: the groups the swap takes) and the swap, the ten-seed held-out choice
    nm = replace(RECOMMENDED, nm="2:4")
    assert recipe_label(nm) == "solver=auto,refine=swap,dense_target=True,intercept=True,permute=auto"
    assert recipe_label(replace(nm, method="magnitude")) == "refine=cg,dense_target=True,intercept=True"
    assert (replace(nm, inactive_weight=0.1).resolved().refine, replace(nm, wbits=4).resolved().refine) == \
        ("cg", "none")  # the swap has no per-row Hessians; a re-solve would leave the grids
    assert replace(nm, wbits=4).resolved().permute is False and nm.resolved(distributed=True).permute is False
    nm.check_runnable(distributed=True)  # auto is no error under torchrun: no permutation there
    assert recipe_label(replace(PUBLISHED, nm="2:4", permute=True)) == "permute=True"
    assert recipe_label(replace(PUBLISHED, nm="2:4")) == ""
    with pytest.raises(UserError, match="without torchrun"):  # the order is chosen on the whole calibration set
        replace(RECOMMENDED, nm="2:4", permute=True).check_runnable(distributed=True)
    channels = replace(RECOMMENDED, structure="channels", keep_macs=0.5)  # damping: each kind's own default
    assert (default.percdamp, channels.resolved().percdamp, replace(channels, percdamp=0.02).resolved().percdamp) \
        == (0.01, 0.001, 0.02)
    published = PruneOptions.build(recipe="published").config
    assert (published.refine, published.dense_target, recipe_label(published)) == ("none", False, "")
    assert recipe_label(replace(PUBLISHED, allocation="dp")) == "allocation=dp"  # as before the change
    # allocation 'auto': dp (KL measure) where it was chosen, uniform wherever it was not measured or cannot run
    unstructured = replace(RECOMMENDED, sparsity=0.7)
    assert recipe_label(unstructured) == \
        "solver=auto,allocation=dp,dp_measure=kl,refine=cg,dense_target=True,intercept=True"
    for other in ({"sparsity": None, "nm": "2:4"}, {"method": "magnitude"}, {"method": "wanda"}, {"wbits": 4}):
        assert replace(unstructured, **other).resolved().allocation == "uniform"
    assert unstructured.resolved(distributed=True).allocation == "uniform"
    unstructured.check_runnable(distributed=True)  # auto is no error under torchrun: it resolves to uniform
    with pytest.raises(UserError, match="without torchrun"):
        replace(unstructured, allocation="dp").check_runnable(distributed=True)
    assert replace(PUBLISHED, sparsity=0.7).resolved().allocation == "uniform"
    assert PruneOptions.build(refine="admm").config.refine == "admm"  # given explicitly: wins over the recipe
    quantized = PruneOptions.build(wbits=4).config.resolved()  # cg would move kept weights off their grids
    assert (quantized.refine, quantized.dense_target, quantized.quant) == ("none", True, "gptq")
    assert replace(PUBLISHED, method="magnitude", wbits=4).resolved().quant == "rtn"  # what runs, not 'gptq'
    with pytest.raises(UserError, match="recipe must be one of"):
        PruneOptions.build(recipe="best")
    for bad, fragment in (({"wbits": 4, "refine": "cg"}, "off their quantization grids"),
                          ({"method": "wanda", "bn_aware": True, "sparsity": 0.5}, "bn_aware"),
                          ({"method": "magnitude", "wbits": 4, "quant": "gptq"}, "round to nearest"),
                          ({"nm": "2:4", "allocation": "dp"}, "N:M is uniform"),
                          ({"sparsity": 0.5, "permute": True}, "give nm"),
                          ({"percdamp": -1.0}, "percdamp must be >= 0"),
                          ({"method": "obs"}, "unknown method 'obs'")):
        with pytest.raises(UserError, match=fragment):
            replace(RECOMMENDED, **bad)

def test_reports_round_trip_and_old_reports_load(tmp_path):
    """report.json: PruneReport.to_json/from_json round trip; a schema-1 report (flat options, `recipe` the label)
    is upgraded on reading; a newer schema is refused with a clear message."""
    from cnn_sparsegpt import PUBLISHED, PruneReport, prune_model
    from cnn_sparsegpt.commands.report import read_report
    from cnn_sparsegpt.utils import UserError

    from .test_prune_model import calib, make

    rep = prune_model(make(), calib(), PUBLISHED, method="sparsegpt", nm="2:4", progress=False)
    back = PruneReport.from_json(json.loads(json.dumps(rep.to_json(), default=str)))
    assert back.config == rep.config and [r.name for r in back.layers] == [r.name for r in rep.layers]
    assert [r.error for r in back.layers] == [r.error for r in rep.layers] and back.sparsity == rep.sparsity
    old = {"model": "mnist_cnn", "method": "sparsegpt", "pattern": "2:4", "recipe": "refine=cg,dense_target=True",
           "refine": "cg", "dense_target": True, "percdamp": 0.01, "bn_recalibration": True, "layers": [],
           "target_sparsity": 0.5}
    (tmp_path / "old.json").write_text(json.dumps(old))
    r = read_report(tmp_path / "old.json")
    assert r["schema"] == 2 and r["recipe_label"] == "refine=cg,dense_target=True"
    assert r["config"] == {"method": "sparsegpt", "percdamp": 0.01, "bn_recalibration": True, "refine": "cg",
                           "dense_target": True, "nm": "2:4", "allocation": "uniform", "budget": "params",
                           "dp_measure": "layer"}  # what ran then, not today's defaults
    (tmp_path / "old_s.json").write_text(json.dumps(old | {"pattern": "0.7", "target_sparsity": 0.7}))
    assert PruneReport.from_json(read_report(tmp_path / "old_s.json")).config.resolved().allocation == "uniform"
    (tmp_path / "new.json").write_text(json.dumps(old | {"schema": 99}))
    with pytest.raises(UserError, match="report schema 99"):
        read_report(tmp_path / "new.json")


def test_bench_patterns_include_channel_targets():
    from cnn_sparsegpt.commands.bench import pattern_options
    from cnn_sparsegpt.utils import UserError

    assert pattern_options("0.5") == {"sparsity": 0.5} and pattern_options("2:4") == {"nm": "2:4"}
    assert pattern_options("keep_macs=0.5") == {"structure": "channels", "keep_macs": 0.5}
    assert pattern_options("target_speedup=2") == {"structure": "channels", "target_speedup": 2.0}
    with pytest.raises(UserError, match="unknown pattern"):
        pattern_options("keep_flops=0.5")
    with pytest.raises(UserError, match="not a number"):
        pattern_options("keep_macs=half")
    assert pattern_options("keep_macs=0.7+2:4") == {"structure": "channels", "keep_macs": 0.7, "nm": "2:4"}
    with pytest.raises(UserError, match="a channel target, then a sparsity"):
        pattern_options("2:4+keep_macs=0.7")
