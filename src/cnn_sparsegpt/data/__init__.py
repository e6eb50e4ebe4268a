"""Images for calibration and evaluation: the built-in datasets and image folders (datasets), folders decoded or
streamed from their files (folders), the model's own preprocessing (preprocess), and synthetic images (synthetic)."""
from .datasets import ImageSet, Loader, calibration_set, load_dataset

__all__ = ["ImageSet", "Loader", "calibration_set", "load_dataset"]
