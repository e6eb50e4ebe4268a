"""The walk over a model: its configuration (config), the traced-graph executor (graph), which layers to prune
(layer_plan), one layer's statistics and solve (layer), BatchNorm re-estimation (batchnorm), the dense target
(dense_target), per-layer allocation (allocation), statistics correction (statcorr), global reconstruction
(reconstruct), the masks kept through training (masks_kept), BN-aware saliency (saliency), torchrun (dist), and the
driver that composes them (prune).
Imports go down only: to kernels/, models/ and utils."""
from .config import PUBLISHED, RECOMMENDED, PruneConfig
from .prune import PruneReport, channel_plan, prune_model

__all__ = ["PUBLISHED", "RECOMMENDED", "PruneConfig", "PruneReport", "channel_plan", "prune_model"]
