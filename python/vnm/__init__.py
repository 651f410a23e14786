"""vnm: V:N:M sparse transformers on NVIDIA GPUs.

Patterns and masks (:class:`Pattern`, :func:`select_mask`, :func:`check_mask`), compressed
storage (:class:`VNMTensor`) and the sparse matrix product (:func:`spmm`).
"""

from __future__ import annotations

from ._native import CUDA_BUILT
from .mask import check_mask, is_valid_mask, select_mask
from .ops import spmm
from .pattern import Pattern, as_pattern
from .tensor import VNMTensor

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

__version__ = "0.1.0"

__all__ = [
    "CUDA_BUILT",
    "Pattern",
    "VNMTensor",
    "as_pattern",
    "check_mask",
    "is_valid_mask",
    "select_mask",
    "spmm",
]
__all__ += _PERMUTE_EXPORTS  # permutation exports (issue 5)
