"""The speed benchmark runs (no timing assertions: the machine is noisy)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DATA, RESNET_CKPT

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def test_solver_table_runs(tmp_path):
    out = tmp_path / "speed.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--skip-model", "--solver-shapes", "16x64,8x96",
                          "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert len(data["solver"]) == 4 and all(r["ours_s"] > 0 and r["naive_s"] > 0 for r in data["solver"])
    assert "| 16x64 | 2:4 |" in res.stdout


@pytest.mark.slow
def test_whole_model_part_runs(tmp_path):
    if not RESNET_CKPT.is_file():
        pytest.skip("shared ResNet-18 checkpoint missing")
    out = tmp_path / "speed.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--solver-shapes", "16x64", "--nsamples", "16",
                          "--weights", str(RESNET_CKPT), "--data-dir", str(DATA), "--json", str(out)],
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr
    model = json.loads(out.read_text())["model"]
    default, low = model["runs"]
    assert default["memory_policy"].startswith("default") and low["low_memory"]
    assert default["forward_passes"] == 1 and low["forward_passes"] > 1
    assert default["sparsity"] == low["sparsity"] == 0.5
    assert low["memory"]["peak_stored_mb"] < default["memory"]["peak_stored_mb"]
    assert set(model["floor"]) == {"forward", "hessian", "cholesky", "total", "gemm_gflops", "hessian_tflop_im2col",
                                   "hessian_tflop_pruner", "limit_im2col", "limit_pruner", "heap_reuse"}
    assert 0 < model["floor"]["hessian_tflop_pruner"] <= model["floor"]["hessian_tflop_im2col"]
