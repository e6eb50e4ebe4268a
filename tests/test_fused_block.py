"""The fused Triton column loop (kernels/fused_block.py) against the torch loop it replaces. Without a GPU it runs in
Triton's interpreter, which must be switched on before triton is first imported: so in a fresh process."""
import json
import os
import subprocess
import sys

import pytest
import torch

import cnn_sparsegpt as cs
from cnn_sparsegpt.kernels.masks import Pattern
from cnn_sparsegpt.kernels.solver import sparsegpt_solve

PATTERNS = ["0.5", "2:4", "4:8"]

# Both loops on the same problems: G=2 matrices, rows not a multiple of the kernel's row tile, a full block of 128
# columns and a partial one, a dead input. Per pattern: the fraction of mask entries that differ, and the largest
# weight difference over the rows whose masks agree (a near-tie can flip a mask entry under other rounding).
COMPARE = """
import json, sys, torch
from cnn_sparsegpt.kernels.masks import Pattern
from cnn_sparsegpt.kernels.solver import sparsegpt_solve

device = sys.argv[1]
g = torch.Generator().manual_seed(0)
G, rows, d = 2, 20, 200
X = torch.randn(G, d, 3 * d, generator=g)
X[:, : d // 2] += X[:, d // 2:]
X[:, 3] = 0
H = (2 * X @ X.transpose(1, 2) / (3 * d)).to(device)
W = torch.randn(G, rows, d, generator=g).to(device)
out = {}
for p in sys.argv[2:]:
    pattern = Pattern.parse(None if ":" in p else float(p), p if ":" in p else None)
    Qf, mf, _ = sparsegpt_solve(W, H, pattern, column_loop="triton")
    Ql, ml, _ = sparsegpt_solve(W, H, pattern, column_loop="loop")
    same = (mf == ml).all(-1)
    out[p] = {"mask_diff": (mf != ml).float().mean().item(), "rows_same": same.float().mean().item(),
              "weight_diff": (Qf - Ql).abs()[same].max().item(), "pruned": mf.float().mean().item()}
print(json.dumps(out))
"""


def _compare(device: str, env: dict | None = None) -> dict:
    run = subprocess.run([sys.executable, "-c", COMPARE, device, *PATTERNS], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _check(result: dict) -> None:
    for p in PATTERNS:
        r = result[p]
        assert abs(r["pruned"] - 0.5) < 1e-9, (p, r)  # every pattern here prunes half
        assert r["mask_diff"] < 0.002 and r["rows_same"] >= 0.95, (p, r)
        assert r["weight_diff"] < 1e-4, (p, r)


def test_fused_loop_matches_the_torch_loop_in_triton_interpreter():
    pytest.importorskip("triton")
    _check(_compare("cpu", dict(os.environ, TRITON_INTERPRET="1")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_loop_matches_the_torch_loop_on_cuda():
    pytest.importorskip("triton")
    _check(_compare("cuda", {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}))


@pytest.mark.parametrize("capability", [80, 90])  # A100, H100/H200
def test_fused_loop_compiles_for_gpus_without_one(capability):
    """The interpreter does not run Triton's compiler: compile every variant for real GPU targets ahead of time
    (Triton's own ptxas; no GPU needed), so that a kernel the interpreter accepts but the compiler rejects fails
    here and not on a user's GPU."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cnn_sparsegpt.kernels.fused_block import _kernel, constants

    sig = {"W_ptr": "*fp32", "E_ptr": "*fp32", "M_ptr": "*i8", "H_ptr": "*fp32", "rows": "i32", "B": "i32",
           "n_groups": "i32"} | dict.fromkeys(constants(128, Pattern(sparsity=0.5)), "constexpr")
    for B, pattern in ((128, Pattern(sparsity=0.5)), (128, Pattern(n=2, m=4)), (128, Pattern(n=4, m=8)),
                       (16, Pattern(n=2, m=4))):
        consts = constants(B, pattern)  # as solve_block_fused launches it
        try:
            compiled = triton.compile(ASTSource(fn=_kernel(), signature=sig, constexprs=consts),
                                      target=GPUTarget("cuda", capability, 32))
        except RuntimeError as e:
            if "ptxas" in str(e).lower() and "not found" in str(e).lower():
                pytest.skip(f"no ptxas here: {e}")
            raise
        assert compiled.asm["cubin"], consts


def test_triton_column_loop_elsewhere_is_one_clear_error(monkeypatch):
    """Asked for where it cannot run (a CPU model, or no triton): one UserError (a one-line error in the CLI), before
    any work from the API, and from the solver itself."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = cs.create_model("mnist_cnn")
    with pytest.raises(cs.UserError, match="column_loop triton"):
        cs.prune_model(model, torch.randn(4, 1, 28, 28), nm="2:4", column_loop="triton")
    with pytest.raises(cs.UserError, match="column_loop 'triton' cannot run"):
        sparsegpt_solve(torch.randn(4, 16), torch.eye(16), Pattern(n=2, m=4), column_loop="triton")


def test_quantized_layers_keep_the_loop_under_any_column_loop():
    """GPTQ's rounding lives in the torch loop: a grid makes column_loop irrelevant (no error on the CPU)."""
    from cnn_sparsegpt.kernels.quant import fit_grid

    W = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    grid = fit_grid(W, 4, "minmax")
    a = sparsegpt_solve(W, torch.eye(16)[None], Pattern(n=2, m=4), column_loop="triton", grid=grid)
    b = sparsegpt_solve(W, torch.eye(16)[None], Pattern(n=2, m=4), column_loop="loop", grid=grid)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
