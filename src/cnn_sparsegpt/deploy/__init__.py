"""What ships: BatchNorm folding, compressed weight files and the runtimes a pruned model is timed on."""
from .compressed import QuantGrid, load_compressed, save_compressed
from .fold import fold_batchnorm, fold_factors

__all__ = ["QuantGrid", "fold_batchnorm", "fold_factors", "load_compressed", "save_compressed"]
