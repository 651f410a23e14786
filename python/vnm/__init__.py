"""vnm: V:N:M sparse transformers on NVIDIA GPUs.

- Format: :class:`Pattern`, :func:`select_mask`, :func:`check_mask`, :class:`VNMTensor`,
  :func:`spmm` (the CUDA kernel layout and its ops are in :mod:`vnm.cuda_ops`); :class:`VNMWeight`,
  the sparse weight as a ``torch.Tensor``.
- Pruning: :func:`calibrate`, :func:`calibrate_sequential`, :mod:`vnm.scores`,
  :func:`compute_masks`, :func:`choose_pattern`, :func:`report`.
- Permutations: :func:`search_permutation` and the zero-cost helpers (:mod:`vnm.permute`).
- Models: :class:`VNMLinear`, :func:`sparsify`, :func:`save` / :func:`load`; recovery training in
  :mod:`vnm.train`.
"""

from __future__ import annotations

import importlib as _importlib
import importlib.util as _importlib_util
import sys as _sys
import types as _types

from ._version import __version__

__all__ = [
    "CUDA_BUILT", "Calibration", "ChannelStats", "KeptReport", "Pattern", "PatternChoice",
    "PermutationResult", "SRSTEConfig", "SparsifyConfig", "SparsifyReport", "SpeedupTable",
    "ThreeStageConfig", "VNMLinear", "VNMTensor", "VNMWeight", "__version__", "apply_masks_", "as_pattern", "calibrate",
    "calibrate_sequential", "check_mask", "choose_pattern", "compute_masks", "cuda_ops", "invert_permutation",
    "is_head_preserving", "is_valid_mask", "kept_fraction", "kept_score", "layer_scores", "load",
    "log_mask_diversity", "model_speedup", "nn", "obs_prune", "permute_attention_values", "permute_between",
    "permute_linear_cols", "permute_linear_rows", "prepare_lora", "prepare_srste", "prunable_layers", "prune_sequential",
    "report", "save", "scores", "search_permutation", "select_mask", "sparsify", "spmm", "train",
    "train_srste", "train_three_stage", "weight_matrix",
]

_SUBMODULES = ("cuda_ops", "nn", "scores", "train")  # public names that are modules


def _import_api() -> None:
    """Import the public API into this package (once; imports torch and registers vnm's torch ops)."""
    _Package._importing = True  # submodules import each other meanwhile: no name is looked up here
    from . import cuda_ops  # registers vnm::pack, vnm::unpack, vnm::spmm_packed, vnm::packed_to_dense
    from . import nn, scores
    from ._native import CUDA_BUILT
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
    from .weight import VNMWeight
    from . import train  # after the modules it builds on
    from .train import SRSTEConfig, ThreeStageConfig, prepare_lora, prepare_srste, train_srste, train_three_stage
    vars(_sys.modules[__name__]).update(locals())
    _Package._loaded = True


class _Package(_types.ModuleType):
    """The ``vnm`` package: its public names are imported on first use (PEP 562), so that
    ``vnm --help`` and ``vnm --version`` answer without importing torch. The first use of any of
    them (``vnm.spmm``, ``from vnm import sparsify``) imports all of them, as ``import vnm`` did
    before."""

    _loaded = False
    _importing = False

    def __getattr__(self, name: str):
        if name in _SUBMODULES or (name not in __all__ and not name.startswith("__")
                                   and _importlib_util.find_spec(f"{__name__}.{name}") is not None):
            # vnm.nn, vnm.checkpoint...: that module alone, as `from vnm import checkpoint` imports it
            return _importlib.import_module(f"{__name__}.{name}")
        if name not in __all__ or _Package._loaded or _Package._importing:
            raise AttributeError(f"module 'vnm' has no attribute {name!r}")
        try:
            _import_api()
        finally:
            _Package._importing = False
        return getattr(self, name)

    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule vnm.sparsify would bind it as vnm.sparsify, whose public
        # meaning is the function vnm.sparsify.sparsify: the name stays the function's.
        if name == "sparsify" and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(__all__))


_sys.modules[__name__].__class__ = _Package
