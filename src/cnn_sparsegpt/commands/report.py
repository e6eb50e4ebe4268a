"""report.json, the record of a `prune` (or `finetune`) run: one JSON object, versioned by `schema`.

Schema 2 (this version) holds, under distinct names: what the run was given (model, model_kwargs: the builder's
keyword arguments, absent in older reports; weights, dataset, data_source,
preprocess, seed, calibration_digest, input_shape, `recipe`: the preset's name), what it measured (dense_acc and
dense_acc_from: measured, or from the cache of an earlier prune's measurement, dense_accuracy_cache.py;
pruned_acc, eval_samples, eval_split; `sparsity` and `total_sparsity`: achieved, `target_sparsity`: asked),
`config`: the resolved PruneConfig that ran (`config.sparsity` is the target), `recipe_label`: the settings that
differ from the published method, `layers`: one entry per Conv2d/Linear, `timings` and the run metadata (commit,
torch version, device, date). Schema 1 (no `schema` key; `recipe` was the label, options flat beside the results)
is upgraded on reading; a newer schema is refused with a clear message.
"""
from __future__ import annotations

from pathlib import Path

from ..utils import UserError, read_json

REPORT_SCHEMA = 2
# the PruneConfig fields a schema-1 report kept flat beside its results (the rest had the defaults of the time)
_SCHEMA1_CONFIG = ("method", "percdamp", "blocksize", "ignore", "prune_all", "bn_recalibration", "low_memory",
                   "refine", "dense_target", "wbits", "quant", "quant_clip")


def upgrade(report: dict, where: str = "report") -> dict:
    """A report of any known schema as schema 2."""
    schema = report.get("schema", 1)
    if schema == REPORT_SCHEMA:
        return report
    if not isinstance(schema, int) or schema > REPORT_SCHEMA or schema < 1:
        raise UserError(f"{where} has report schema {schema!r}; this version of cnn-sparsegpt reads schemas 1 to "
                        f"{REPORT_SCHEMA}: upgrade cnn-sparsegpt")
    r = dict(report)
    r["recipe_label"] = r.pop("recipe", "") or ""
    config = {k: r[k] for k in _SCHEMA1_CONFIG if k in r}
    pattern = str(r.get("pattern", ""))
    config |= {"nm": pattern} if ":" in pattern else {"sparsity": r.get("target_sparsity")}
    alloc = r.get("allocation") or {}  # schema 1 predates the 'auto' allocation and the KL measure's default
    config |= {"allocation": alloc.get("kind", "uniform"), "budget": alloc.get("budget", "params"),
               "dp_measure": alloc.get("dp_measure", "layer")}
    r["config"] = config
    r["bn_recalibrated"] = r.get("bn_recalibrated", r.pop("bn_recalibration", None))
    r["schema"] = REPORT_SCHEMA
    return r


def read_report(path: str | Path) -> dict:
    """A run's report.json (any known schema, upgraded), or one UserError that says what is wrong with it."""
    report = upgrade(read_json(path, "run report"), str(path))
    if not isinstance(report.get("model"), str) or not isinstance(report.get("layers", []), list):
        raise UserError(f"{path} names no model: it is not the report of a `cnn-sparsegpt prune` run")
    return report
