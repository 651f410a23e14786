"""Mask selection and validity for V:N:M and N:M patterns (exact selection runs in C++)."""

from __future__ import annotations

import torch

from ._checks import require_2d
from ._native import _C
from .pattern import PatternLike, as_pattern


def select_mask(scores: torch.Tensor, pattern: PatternLike) -> torch.Tensor:
    """The mask that keeps the most total score under ``pattern``.

    ``scores`` (R x K, finite and non-negative: importance such as ``weight.abs()``) is any float
    tensor on any device; the result is a ``torch.bool`` tensor of the same shape and device.

    V:N:M: in every V x M block, the 4 columns and per row the 2 of them that maximise the kept
    sum, exactly (branch and bound over the C(M, 4) column sets). N:M: the top N of every M per
    row. Ties go to lower column indices. Shapes that are not multiples of V or M are padded with
    zero scores, selected and cropped.
    """
    p = as_pattern(pattern)
    require_2d(scores, "scores")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    R, K = scores.shape
    s = scores.detach().to(device="cpu", dtype=torch.float32).contiguous()
    out = torch.empty((R, K), dtype=torch.uint8)
    _C.select_mask(s, R, K, p, out)
    return out.view(torch.bool).to(scores.device)


def _mask_bytes(mask: torch.Tensor) -> torch.Tensor:
    require_2d(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a torch.bool tensor, got {mask.dtype}")
    return mask.detach().to("cpu").contiguous().view(torch.uint8)


def mask_error(mask: torch.Tensor, pattern: PatternLike) -> str:
    """Empty string if ``mask`` is valid for ``pattern``, else why not (first offending block)."""
    p = as_pattern(pattern)
    m = _mask_bytes(mask)
    return _C.check_mask(m, m.shape[0], m.shape[1], p)


def check_mask(mask: torch.Tensor, pattern: PatternLike) -> None:
    """Raises ``ValueError`` naming the first offending block (row block, column group) and why.

    A mask is valid for V:N:M when every V x M block keeps values in at most 4 columns and every
    row at most 2 per group; for N:M when every row keeps at most N of every M.
    """
    err = mask_error(mask, pattern)
    if err:
        raise ValueError(err)


def is_valid_mask(mask: torch.Tensor, pattern: PatternLike) -> bool:
    """Whether ``mask`` satisfies ``pattern`` (see :func:`check_mask`)."""
    return not mask_error(mask, pattern)
