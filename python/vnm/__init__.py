"""vnm: V:N:M sparse transformers on NVIDIA GPUs.

Patterns and masks (:class:`Pattern`, :func:`select_mask`, :func:`check_mask`), compressed
storage (:class:`VNMTensor`) and the sparse matrix product (:func:`spmm`).
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

__all__ = [
    "CUDA_BUILT",
    "SparsifyConfig",
    "VNMLinear",
    "Pattern",
    "VNMTensor",
    "as_pattern",
    "check_mask",
    "is_valid_mask",
    "load",
    "save",
    "select_mask",
    "sparsify",
    "spmm",
]

# ---- recovery training (vnm.train: three-stage LoRA, SR-STE, merge) ----
from . import train  # noqa: E402,F401
from .train import (  # noqa: E402
    SRSTEConfig, ThreeStageConfig, prepare_lora, prepare_srste, train_srste, train_three_stage,
)

__all__ += ["SRSTEConfig", "ThreeStageConfig", "prepare_lora", "prepare_srste", "train", "train_srste",
            "train_three_stage"]
# ---- end recovery training ----
