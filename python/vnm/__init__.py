"""vnm: V:N:M sparse transformers on NVIDIA GPUs.

- Format: :class:`Pattern`, :func:`select_mask`, :func:`check_mask`, :class:`VNMTensor`,
  :func:`spmm` (the CUDA kernel layout and its ops are in :mod:`vnm.cuda_ops`).
- Pruning: :func:`calibrate`, :func:`calibrate_sequential`, :mod:`vnm.scores`,
  :func:`compute_masks`, :func:`choose_pattern`, :func:`report`.
- Permutations: :func:`search_permutation` and the zero-cost helpers (:mod:`vnm.permute`).
- Models: :class:`VNMLinear`, :func:`sparsify`, :func:`save` / :func:`load`; recovery training in
  :mod:`vnm.train`.
"""

from __future__ import annotations

from . import cuda_ops  # registers vnm::pack, vnm::unpack, vnm::spmm_packed, vnm::packed_to_dense
from . import nn, scores
from ._native import CUDA_BUILT
from ._version import __version__
from .calibration import Calibration, ChannelStats, calibrate, calibrate_sequential
from .checkpoint import load, save
from .choose import PatternChoice, SpeedupTable, choose_pattern, log_mask_diversity, model_speedup
from .layers import prunable_layers, weight_matrix
from .mask import check_mask, is_valid_mask, select_mask
from .obs import obs_prune, prune_sequential
from .nn import VNMLinear
from .ops import spmm
from .pattern import Pattern, as_pattern
from .permute import (
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
from .pruning import apply_masks_, compute_masks, kept_fraction, layer_scores
from .reports import KeptReport, report
from .sparsify import SparsifyConfig, SparsifyReport, sparsify
from .tensor import VNMTensor
from . import train  # after the modules it builds on
from .train import SRSTEConfig, ThreeStageConfig, prepare_lora, prepare_srste, train_srste, train_three_stage

__all__ = [
    "obs_prune",
    "prune_sequential",
    "CUDA_BUILT", "Calibration", "ChannelStats", "KeptReport", "Pattern", "PatternChoice",
    "PermutationResult", "SRSTEConfig", "SparsifyConfig", "SparsifyReport", "SpeedupTable",
    "ThreeStageConfig", "VNMLinear", "VNMTensor", "__version__", "apply_masks_", "as_pattern", "calibrate",
    "calibrate_sequential", "check_mask", "choose_pattern", "compute_masks", "cuda_ops", "invert_permutation",
    "is_head_preserving", "is_valid_mask", "kept_fraction", "kept_score", "layer_scores", "load",
    "log_mask_diversity", "model_speedup", "nn", "permute_attention_values", "permute_between",
    "permute_linear_cols", "permute_linear_rows", "prepare_lora", "prepare_srste", "prunable_layers",
    "report", "save", "scores", "search_permutation", "select_mask", "sparsify", "spmm", "train",
    "train_srste", "train_three_stage", "weight_matrix",
]
