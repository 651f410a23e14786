"""Sparsity patterns: ``V:N:M`` (blocks of V rows x M columns keeping 4 shared columns, 2 per row)
and plain ``N:M``. The rules live in C++ (``cpp/include/vnm/format.h``); this module re-exports
the class and converts user input."""

from __future__ import annotations

from typing import Union

from ._native import _C

Pattern = _C.Pattern
Pattern.__module__ = "vnm"

PatternLike = Union[str, "Pattern"]


def as_pattern(pattern: PatternLike) -> Pattern:
    """``Pattern`` from a pattern or its text ('64:2:8', '2:4', surrounding whitespace ignored);
    raises ``ValueError`` or ``TypeError`` naming the problem."""
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, str):
        return Pattern.parse(pattern)
    raise TypeError(
        f"pattern must be a vnm.Pattern or a string like '64:2:8' or '2:4', got {type(pattern).__name__}"
    )


def require_compressible(pattern: Pattern) -> Pattern:
    if not pattern.compressible:
        raise ValueError(
            f"pattern '{pattern}' cannot be stored compressed or run on sparse tensor cores: "
            "use a V:N:M pattern (e.g. '64:2:8') or '2:4'"
        )
    return pattern
