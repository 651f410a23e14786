"""vnm: V:N:M sparse transformers on NVIDIA GPUs.

Patterns and masks (:class:`Pattern`, :func:`select_mask`, :func:`check_mask`), compressed
storage (:class:`VNMTensor`) and the sparse matrix product (:func:`spmm`). The CUDA kernel layout
and its ops (pack / unpack / spmm_packed) are in :mod:`vnm.cuda_ops`.
Pruning: calibration (:func:`calibrate`, :func:`calibrate_sequential`), scores
(:mod:`vnm.scores`), model masks (:func:`compute_masks`, :func:`apply_masks_`), the choice of V
and M (:func:`choose_pattern`) and kept-importance reports (:func:`report`).
"""

from __future__ import annotations

from ._native import CUDA_BUILT
from ._version import __version__
from .checkpoint import load, save
from .mask import check_mask, is_valid_mask, select_mask
from .nn import VNMLinear
from .ops import spmm
from .pattern import Pattern, as_pattern
from .sparsify import SparsifyConfig, sparsify
from .tensor import VNMTensor
from . import nn  # noqa: F401  (vnm.nn.VNMLinear)
from . import cuda_ops  # registers vnm::pack, vnm::unpack, vnm::spmm_packed, vnm::packed_to_dense

# ---- issue 4: pruning scores, calibration, pattern choice, reports (begin) ----
from . import scores
from .calibration import Calibration, ChannelStats, calibrate, calibrate_sequential
from .choose import PatternChoice, SpeedupTable, choose_pattern, log_mask_diversity, model_speedup
from .layers import prunable_layers, weight_matrix
from .pruning import apply_masks_, compute_masks, kept_fraction, layer_scores
from .reports import KeptReport, report
# ---- issue 4 (end) ----

# ---- permutation search and zero-cost permutations (issue 5) ----
from .permute import (  # noqa: E402
    PermutationResult,
    invert_permutation,
    is_head_preserving,
    kept_score,
    permute_attention_values,
    permute_between,
    permute_linear_cols,
    permute_linear_rows,
    search_permutation,
)

_PERMUTE_EXPORTS = [
    "PermutationResult",
    "invert_permutation",
    "is_head_preserving",
    "kept_score",
    "permute_attention_values",
    "permute_between",
    "permute_linear_cols",
    "permute_linear_rows",
    "search_permutation",
]
# ---- end permutation exports ----

__all__ = [
    "CUDA_BUILT",
    "SparsifyConfig",
    "VNMLinear",
    "Pattern",
    "VNMTensor",
    "as_pattern",
    "cuda_ops",
    "check_mask",
    "is_valid_mask",
    "load",
    "save",
    "select_mask",
    "sparsify",
    "spmm",
    # ---- issue 4 (begin) ----
    "Calibration",
    "ChannelStats",
    "KeptReport",
    "PatternChoice",
    "SpeedupTable",
    "apply_masks_",
    "calibrate",
    "calibrate_sequential",
    "choose_pattern",
    "compute_masks",
    "kept_fraction",
    "layer_scores",
    "log_mask_diversity",
    "model_speedup",
    "prunable_layers",
    "report",
    "scores",
    "weight_matrix",
    # ---- issue 4 (end) ----
]
__all__ += _PERMUTE_EXPORTS  # permutation exports (issue 5)
