"""vnm: V:N:M sparse transformers on NVIDIA GPUs.

Patterns and masks (:class:`Pattern`, :func:`select_mask`, :func:`check_mask`), compressed
storage (:class:`VNMTensor`) and the sparse matrix product (:func:`spmm`). The CUDA kernel layout
and its ops (pack / unpack / spmm_packed) are in :mod:`vnm.cuda_ops`.
"""

from __future__ import annotations

from ._native import CUDA_BUILT
from .mask import check_mask, is_valid_mask, select_mask
from .ops import spmm
from .pattern import Pattern, as_pattern
from .tensor import VNMTensor
from . import cuda_ops  # registers vnm::pack, vnm::unpack, vnm::spmm_packed, vnm::packed_to_dense

__version__ = "0.1.0"

__all__ = [
    "CUDA_BUILT",
    "Pattern",
    "VNMTensor",
    "as_pattern",
    "cuda_ops",
    "check_mask",
    "is_valid_mask",
    "select_mask",
    "spmm",
]
