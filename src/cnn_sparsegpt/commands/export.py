"""`cnn-sparsegpt export RUN_DIR`: a pruned run as a deployable file. BatchNorm is folded into the convs
before it (a deployed network runs the folded weights), then the model goes to ONNX (checked in
onnxruntime against PyTorch), an INT8 ONNX model for ONNX Runtime (deploy/int8.py: activation ranges from the run's
own calibration images, top-1 measured against the float model on the run's evaluation images), safetensors and/or a
compressed file (deploy.compressed: bitmasks, packed integer codes), with a JSON report per layer: multiply-adds,
non-zeros, and whether its 2:4 pattern survived folding in the layout sparse tensor cores use (groups of 4 along input
channels, at each kernel position).

A quantized run's folded weights are its integer codes times the folded scales (each channel's scale times
its BatchNorm factor): every output (ONNX, safetensors, compressed) carries exactly those weights.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..deploy.accuracy import image_count
from ..deploy.compressed import QuantGrid, dequantize, nbytes, quant_codes, save_compressed
from ..deploy.fold import fold_batchnorm, fold_factors
from ..deploy.int8 import CALIBRATION, check as check_int8, onnx_top1, quantize_int8
from ..deploy.onnx_file import OPSET, write_onnx
from ..pruning.conv_views import VIEWABLE
from ..pruning.graph import PRUNABLE
from ..pruning.layer_plan import forward_order
from .pipeline import load_run, run_images
from ..utils import (UserError, as_module, atomic_write_json, ensure_writable, forward_checked, load_tensors,
                     output_tensors, save_safetensors)

_SHAPES = {"mnist": [1, 28, 28], "cifar10": [3, 32, 32]}


def input_shape(report: dict) -> list[int]:
    """(C, H, W) of one input: recorded by `prune`, else the dataset's convention or the preprocessing's crop."""
    if report.get("input_shape"):
        return list(report["input_shape"])
    crop = (report.get("preprocess") or {}).get("crop")
    if crop:
        return [3, crop, crop]
    if report.get("dataset") in _SHAPES:
        return _SHAPES[report["dataset"]]
    raise UserError("this run does not record its input shape: give --input-shape C H W")


def nm_ok(weight: torch.Tensor, n: int = 2, m: int = 4, in_dim: int = 1) -> bool:
    """At most n non-zeros in every group of m consecutive input channels (dim `in_dim`: 0 for a transposed conv) at
    each kernel position."""
    if weight.shape[in_dim] % m:
        return False
    return bool(((weight.movedim(in_dim, -1).reshape(-1, m) != 0).sum(-1) <= n).all())


def layer_table(folded: nn.Module, example: torch.Tensor, masks: dict) -> list[dict]:
    positions: dict[str, int] = {}
    order = forward_order(folded, example, positions=positions, kinds=(*PRUNABLE, *VIEWABLE))
    modules = dict(folded.named_modules())
    rows = []
    for name in order:
        m = modules[name]
        w = m.weight.detach()
        nnz = int((w != 0).sum())
        in_dim = 0 if isinstance(m, nn.modules.conv._ConvTransposeNd) else 1
        was_24 = f"{name}.weight" in masks and nm_ok(masks[f"{name}.weight"].float(), in_dim=in_dim)  # True = kept
        row = {"name": name, "shape": list(w.shape), "macs": int(w.numel() * positions.get(name, 1)),
               "nonzero_macs": nnz * positions.get(name, 1), "sparsity": 1 - nnz / w.numel(),
               "two_four": nm_ok(w, in_dim=in_dim)}
        dense_conv = getattr(m, "groups", 1) == 1 and in_dim == 1  # (TensorRT's sparse kernels: no deconvolution)
        row["sparse_tensor_core_candidate"] = row["two_four"] and dense_conv and row["sparsity"] > 0.4
        if was_24 and not row["two_four"]:
            raise UserError(f"{name}: 2:4 before folding BatchNorm but not after (please report this)")
        rows.append(row)
    return rows


@torch.no_grad()
def folded_grids(model: nn.Module, folded: nn.Module, quantized: dict,
                 example: torch.Tensor | None = None) -> dict[str, QuantGrid]:
    """A quantized run's grids in the folded model (scales times the fold's factors); the folded weights are set
    to their codes on those grids (within float rounding of what folding computed). example: as fold_batchnorm's."""
    factors = fold_factors(model, list(quantized), example)
    params = dict(folded.named_parameters())
    grids = {}
    for name, q in quantized.items():
        w = model.get_parameter(name).detach()
        own = QuantGrid(q["scale"].reshape(-1).float(), q["zero"].reshape(-1).to(torch.uint8), int(q["bits"]))
        codes = quant_codes(w, own, name)
        grids[name] = QuantGrid(own.scale * factors[name], own.zero, own.bits)
        params[name].copy_(dequantize(codes, grids[name]))
    return grids


@dataclass(frozen=True)
class RunData:
    """What `export --int8` and `latency --top1` read: the run's data and how much of it."""
    data_dir: str | None = None  # where the run's dataset lies (as prune's --data-dir)
    calibration: str = "minmax"  # ORT's activation-range method for INT8 (deploy.int8.CALIBRATION)
    samples: int | None = None  # INT8 calibration images: the first N of the run's own (default all of them)
    eval_samples: int | None = None  # evaluation images: the first N of the run's (default all; 0: no evaluation)
    progress: bool = True

    def check(self) -> None:
        """Bad values as one line each, before any work."""
        if self.calibration not in CALIBRATION:
            raise UserError(f"unknown --int8-calibration '{self.calibration}'; choose from {', '.join(CALIBRATION)}")
        for name, value, least in (("int8-samples", self.samples, 1), ("eval-samples", self.eval_samples, 0)):
            if value is not None and value < least:
                raise UserError(f"--{name} must be at least {least}, got {value}")


Int8Options = RunData  # its name before `latency --top1` read it too


def run_data(report: dict, options: RunData, flag: str):
    """The run's calibration images, evaluation images, and whether the former are the run's own (run_images)."""
    if not report.get("preprocess") or not report.get("nsamples"):
        raise UserError(f"this run's report.json does not record its data (preprocess, nsamples): {flag} needs the "
                        "run's images")
    return run_images(report, options.data_dir, nsamples=options.samples, eval_samples=options.eval_samples)


def add_run_data_arguments(p, flag: str) -> None:
    """The RunData flags of a command whose `flag` reads the run's data."""
    p.add_argument("--data-dir", help=f"with {flag}: where the run's dataset lies (as prune's --data-dir)")
    p.add_argument("--int8-calibration", default="minmax", choices=CALIBRATION,
                   help=f"with {flag}: how ONNX Runtime sets INT8 activation ranges (default minmax; percentile and "
                        "entropy keep every calibration batch's activations in memory)")
    p.add_argument("--int8-samples", type=int, help=f"with {flag}: calibrate INT8 on the first N of the run's "
                   "calibration images (default all of them)")
    p.add_argument("--eval-samples", type=int, help=f"with {flag}: measure top-1 on the first N of the run's "
                   "evaluation images (default all; 0: do not measure)")


def run_data_options(args, flag: str, used: bool) -> RunData | None:
    """The RunData flags of a command as given, where `flag` (which reads them) is `used`; None where it is not, and
    then any of them given is a one-line error (they would change nothing)."""
    given = [f"--{k.replace('_', '-')}" for k, default in (("data_dir", None), ("int8_calibration", "minmax"),
                                                            ("int8_samples", None), ("eval_samples", None))
             if getattr(args, k) != default]
    if not used:
        if given:
            raise UserError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} with {flag} only: give "
                            f"{flag}, or drop {'it' if len(given) == 1 else 'them'}")
        return None
    return RunData(args.data_dir, args.int8_calibration, args.int8_samples, args.eval_samples,
                   progress=not args.quiet)


@torch.no_grad()
def export_model(model: nn.Module, input_shape: list[int] | tuple[int, ...], onnx: str | Path | None = None,
                 safetensors: str | Path | None = None, compressed: str | Path | None = None,
                 int8: str | Path | None = None, *, masks: dict | None = None, quantized: dict | None = None,
                 calibration: torch.Tensor | None = None, eval_data=None, int8_calibration: str = "minmax",
                 opset: int = OPSET, atol: float = 1e-4, progress: bool = True) -> dict:
    """What `export` writes, for a model in memory (e.g. after prune_model), on inputs of `input_shape` (one input's,
    without the batch: (3, 224, 224); or an example batch tensor): BatchNorm folded into the convs, then
    an ONNX model checked in ONNX Runtime within `atol` (times the largest output where that is above 1),
    safetensors, a compressed file (`quantized`: a --wbits prune's report.quantized, packed as codes) and/or an
    INT8 ONNX model calibrated on the images `calibration` (N, C, H, W), with the float and INT8 top-1 over
    `eval_data` when given (an ImageSet, an (images, labels) pair of tensors, or (images, labels) batches such as a
    DataLoader). Returns the export
    report (per-layer table, sizes, checks); `masks` (name → True where kept) marks what the table counts."""
    for path in (onnx, safetensors, compressed, int8):  # before any work: one clear error
        if path is not None:
            ensure_writable(Path(path).parent)
    if int8 is not None:
        check_int8()
        if calibration is None or not len(calibration):
            raise UserError("an INT8 export needs calibration images (the inputs prune_model calibrated on)")
        RunData(calibration=int8_calibration).check()
    model = copy.deepcopy(as_module(model)).cpu().eval()  # the caller's module keeps its device and mode
    shape = list(input_shape.shape[1:] if torch.is_tensor(input_shape) else input_shape)  # (an example batch's)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    forward_checked(model, x, f"inputs of shape {[4, *shape]}",
                    ". input_shape is one input's shape without the batch, e.g. (3, 224, 224), or give an example "
                    "batch tensor")
    folded = fold_batchnorm(model, example=x)
    grids = folded_grids(model, folded, quantized or {}, x)
    for p in folded.parameters():  # -0.0 (a zero times a negative factor) as +0.0: one bit pattern for zero
        p.add_(0.0)
    reference = output_tensors(model(x))  # every output (a segmentation model's dict: each of its tensors)
    if not reference:
        raise UserError(f"{type(model).__name__}'s output holds no tensor: there is nothing to export and check")
    bns = [sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()) for net in (model, folded)]
    out = {"input_shape": shape, "batchnorm_folded": bns[0] - bns[1], "batchnorm_left": bns[1],
           "quantized_layers": len(grids),
           "folded_max_abs_diff": max_abs_diff(output_tensors(folded(x)), reference),
           "layers": layer_table(folded, x[:1], masks or {})}
    state = {k: v.contiguous() for k, v in folded.state_dict().items()}
    out["sizes"] = {"state_dict_bytes": nbytes(model.state_dict()), "folded_bytes": nbytes(state)}
    if safetensors is not None:
        save_safetensors(state, safetensors)
        out["safetensors"] = str(safetensors)
    if compressed is not None:
        packed = save_compressed(state, compressed, grids)
        out["compressed"] = str(compressed)
        out["sizes"] |= {"compressed_bytes": packed["bytes"], "encodings": packed["encodings"],
                         "compressed_fraction": packed["bytes"] / out["sizes"]["state_dict_bytes"]}
    if onnx is not None:
        out |= _onnx(folded, x, reference, Path(onnx), opset, atol)
    if int8 is not None:
        out |= _int8(folded, x, reference, Path(int8), Path(onnx) if onnx else None, opset, atol, calibration,
                     eval_data, int8_calibration, progress)
    return out


@torch.no_grad()
def export_run(run_dir: str | Path, onnx_path: str | Path | None = None, safetensors_path: str | Path | None = None,
               shape: list[int] | None = None, opset: int = OPSET, atol: float = 1e-4,
               compressed_path: str | Path | None = None, int8_path: str | Path | None = None,
               int8: RunData = RunData()) -> dict:
    """export_model on a `prune` run's folder (INT8 on the run's own images); returns (and writes beside the first
    output) the export report."""
    outputs = [p for p in (onnx_path, int8_path, safetensors_path, compressed_path) if p is not None]
    if not outputs:
        raise UserError("nothing to export: give --onnx PATH, --int8 PATH, --safetensors PATH and/or --compressed "
                        "PATH")
    for path in outputs:  # before any work: a folder that cannot be made is one clear error
        ensure_writable(Path(path).parent)
    if int8_path is not None:
        check_int8()
        int8.check()
    model, report, masks = load_run(run_dir)
    quant_file = Path(run_dir) / "quant.pt"
    quantized = load_tensors(quant_file, "quantization file") if quant_file.is_file() else {}
    calib, test, same = run_data(report, int8, "--int8") if int8_path is not None else (None, None, None)
    # top-1 needs a classifier on labelled images (a run that measured outputs has no labels to count)
    evaluate = int8_path is not None and len(test) and int8.eval_samples != 0 and report.get("metric") != "output"
    out = {"run": str(run_dir), "model": report["model"], "pattern": report.get("pattern")} | export_model(
        model, shape or input_shape(report), onnx_path, safetensors_path, compressed_path, int8_path, masks=masks,
        quantized=quantized, calibration=calib, eval_data=test if evaluate else None,
        int8_calibration=int8.calibration, opset=opset, atol=atol, progress=int8.progress)
    if int8_path is not None:
        out["int8_calibration_is_the_runs"] = same and not int8.samples
    if evaluate:
        out["int8_eval_split"] = report.get("eval_split", "test")
    atomic_write_json(out, Path(outputs[0]).with_suffix(".export.json"))
    return out


def max_abs_diff(got: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The largest difference between two models' outputs (each a list of tensors, output_tensors' order)."""
    if len(got) != len(reference) or any(g.shape != r.shape for g, r in zip(got, reference)):
        raise UserError(f"the exported model's outputs have other shapes than PyTorch's: "
                        f"{[list(t.shape) for t in got]} against {[list(t.shape) for t in reference]}")
    return max(float((g - r).abs().max()) for g, r in zip(got, reference))


def _onnx(folded: nn.Module, x: torch.Tensor, reference: list[torch.Tensor], path: Path, opset: int,
          atol: float) -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'cnn-sparsegpt[export]'") \
            from None
    write_onnx(folded, x, path, opset)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = max_abs_diff([torch.from_numpy(a) for a in session.run(None, {"images": x.numpy()})], reference)
    # float32 rounding grows with the outputs: a network whose logits reach 50 differs by ~1e-4 between two correct
    # runtimes, so the tolerance is atol on outputs of magnitude up to 1 and atol times the largest one above that
    bound = atol * max(1.0, max(float(r.abs().max()) for r in reference))
    if not diff <= bound:  # a network whose float32 outputs are that far from exact (float64) allows 4x as much
        bound = max(bound, 4 * float32_rounding(folded, x))
    if not diff <= bound:
        raise UserError(f"the ONNX model's outputs differ from PyTorch's by {diff:.2e} (> {bound:.2g}: {atol:g} of "
                        "the largest output, at least 1, or 4 times PyTorch's own float32 rounding)")
    return {"onnx": str(path), "opset": opset, "onnxruntime": ort.__version__, "onnx_max_abs_diff": diff}


@torch.no_grad()
def float32_rounding(model: nn.Module, x: torch.Tensor) -> float:
    """How far `model`'s float32 outputs on x are from its float64 ones (largest absolute difference): how much two
    correct float32 runtimes may differ on this network."""
    exact = output_tensors(copy.deepcopy(model).double()(x.double()))
    return max_abs_diff([t.double() for t in output_tensors(model(x))], exact)


def _int8(folded: nn.Module, x: torch.Tensor, reference: list[torch.Tensor], path: Path, float_path: Path | None,
          opset: int, atol: float, calibration: torch.Tensor, test, method: str, progress: bool) -> dict:
    """The INT8 model from the float ONNX model (written to a temporary file unless --onnx wrote one), calibrated on
    `calibration`; top-1 of both on the evaluation images `test` (None: not measured)."""
    with tempfile.TemporaryDirectory() as tmp:
        if float_path is None:
            float_path = Path(tmp) / "float.onnx"
            _onnx(folded, x, reference, float_path, opset, atol)
        out = quantize_int8(float_path, path, calibration, method)
        if test is not None:
            out |= {"int8_eval_images": image_count(test),
                    "float_top1": onnx_top1(float_path, test, progress=progress, desc="float accuracy"),
                    "int8_top1": onnx_top1(path, test, progress=progress)}
    return out


def format_export(out: dict, verb: str = "wrote") -> str:
    """An export's record (FILE.export.json) in a few lines: what was folded, what is non-zero, each file written
    (`verb` before its name)."""
    layers = out["layers"]
    cand = [r["name"] for r in layers if r["sparse_tensor_core_candidate"]]
    macs, nz = sum(r["macs"] for r in layers), sum(r["nonzero_macs"] for r in layers)
    left = f" ({out['batchnorm_left']} left: not after a conv it folds into)" if out["batchnorm_left"] else ""
    named = ": " + ", ".join(cand) if cand and len(cand) <= 8 else ""
    lines = [f"{out['model']}: {out['batchnorm_folded']} BatchNorms folded{left}; {nz / 1e6:.1f} of "
             f"{macs / 1e6:.1f} M multiply-adds per image non-zero; {len(cand)} of {len(layers)} layers 2:4 along "
             f"input channels (sparse tensor core candidates){named}"]
    for key in ("onnx", "safetensors"):
        if key in out:
            extra = (f" (opset {out['opset']}, onnxruntime max |diff| {out['onnx_max_abs_diff']:.1e})"
                     if key == "onnx" else "")
            lines.append(f"{verb} {out[key]}{extra}")
    if "int8" in out:
        images = f"{out['int8_calibration_images']} calibration images" + \
            ("" if out["int8_calibration_is_the_runs"] else " (not the run's own: other data or --int8-samples)")
        top1 = f"; top-1 {100 * out['float_top1']:.2f}% float -> {100 * out['int8_top1']:.2f}% INT8 on " \
            f"{out['int8_eval_images']} {out['int8_eval_split']} images" if "int8_top1" in out else ""
        kept = "zeros kept" if out["int8_zeros_kept"] else "SOME ZERO WEIGHTS LOST (please report this)"
        lines.append(f"{verb} {out['int8']} (INT8, {out['int8_calibration']} ranges from {images}; {kept}{top1})")
    if "compressed" in out:
        sizes = out["sizes"]
        lines.append(f"{verb} {out['compressed']}: {sizes['compressed_bytes'] / 1e6:.2f} MB, "
                     f"{sizes['compressed_fraction']:.1%} of the fp32 state dict "
                     f"({sizes['state_dict_bytes'] / 1e6:.2f} MB)")
    return "\n".join(lines)
