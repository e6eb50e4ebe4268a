"""cnn-sparsegpt: one-shot SparseGPT pruning of convolutional networks."""
from .data import ImageSet, Loader, calibration_set, load_dataset
from .layer import LayerPruner, LayerResult
from .masks import Pattern, nm_prune_mask, topk_prune_mask
from .models import create_model, list_models, register_model
from .prune import PruneReport, prune_model
from .solver import METHODS, sparsegpt_solve
from .train import TrainConfig, evaluate, train_model
from .utils import UserError, load_state_dict

__all__ = [
    "METHODS", "ImageSet", "LayerPruner", "LayerResult", "Loader", "Pattern", "PruneReport", "TrainConfig",
    "UserError", "calibration_set", "create_model", "evaluate", "list_models", "load_dataset", "load_state_dict",
    "nm_prune_mask", "prune_model", "register_model", "sparsegpt_solve", "topk_prune_mask", "train_model",
]
__version__ = "0.1.0"
