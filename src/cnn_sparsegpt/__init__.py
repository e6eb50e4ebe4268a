"""cnn-sparsegpt: one-shot SparseGPT pruning of convolutional networks."""
from .masks import Pattern, nm_prune_mask, topk_prune_mask
from .solver import METHODS, LayerPruner, LayerResult, sparsegpt_solve
from .utils import UserError

__all__ = [
    "METHODS", "LayerPruner", "LayerResult", "Pattern", "UserError",
    "nm_prune_mask", "sparsegpt_solve", "topk_prune_mask",
]
__version__ = "0.1.0"
