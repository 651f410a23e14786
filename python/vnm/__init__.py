"""vnm: V:N:M sparse transformers on NVIDIA GPUs.

Patterns and masks (:class:`Pattern`, :func:`select_mask`, :func:`check_mask`), compressed
storage (:class:`VNMTensor`) and the sparse matrix product (:func:`spmm`). The CUDA kernel layout
and its ops (pack / unpack / spmm_packed) are in :mod:`vnm.cuda_ops`.
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
]
