"""The math of one layer, on tensors only (no modules, no data): the SparseGPT/OBS solve and the other masks
(solver), the factorizations under it (linalg), N:M and unstructured masks (masks), quantization grids (quant)
and the refined solves (refine)."""
