"""cnn-sparsegpt: one-shot SparseGPT pruning of convolutional networks."""
from .commands.export import export_model
from .commands.finetune import finetune_run
from .commands.latency import compare_latency
from .commands.pipeline import load_run
from .commands.train import TrainConfig, evaluate, output_error, train_model
from .deploy import load_compressed, save_compressed
from .data import ImageSet, Loader, calibration_set, load_dataset
from .kernels.masks import Pattern
from .kernels.solver import METHODS, sparsegpt_solve
from .models import create_model, list_models, register_model
from .pruning import PUBLISHED, RECOMMENDED, PruneConfig, PruneReport, channel_plan, prune_model
from .pruning.layer import LayerPruner, LayerResult
from .pruning.masks_kept import keep_masks
from .pruning.slicing import apply_structure
from .checkpoints import load_state_dict
from .utils import UserError

__all__ = [
    "METHODS", "PUBLISHED", "RECOMMENDED", "ImageSet", "LayerPruner", "LayerResult", "Loader", "Pattern",
    "PruneConfig", "PruneReport", "TrainConfig", "UserError", "apply_structure", "calibration_set", "channel_plan",
    "compare_latency", "create_model", "evaluate", "export_model", "finetune_run", "keep_masks", "list_models",
    "load_compressed", "load_dataset", "load_run", "load_state_dict", "output_error", "prune_model", "register_model",
    "save_compressed", "sparsegpt_solve", "train_model",
]
__version__ = "0.1.0"
