"""``VNMTensor``: a weight matrix in the canonical V:N:M storage of ``cpp/include/vnm/format.h``.

=========  ==================  ==================  ==============================================
array      dtype               shape               meaning
=========  ==================  ==================  ==============================================
values     fp32 / fp16 / bf16  [R', G, 2]          the 2 kept values per row and group, ascending
meta       uint8               [R', ceil(G/2)]     2-bit positions (among the 4 selected columns)
                                                   of the 2 kept values; two groups per byte
columns    uint8               [R'/V, G, 4]        the 4 selected column offsets in [0, M)
perm       int32, optional     [K]                 the stored matrix multiplies ``x[..., perm]``
row_perm   int32, optional     [R]                 stored row r is output row ``row_perm[r]``
=========  ==================  ==================  ==============================================

``R'`` is R padded to a multiple of V (16 for plain 2:4) and ``G = ceil(K / M)``. The two
permutations regroup which rows and columns share a V x M block (see :func:`vnm.search_permutation`)
without changing the function: ``stored[r, k] = W[row_perm[r], perm[k]]`` for the layer's weight W.
``perm`` is a gather of x where the layer reads its input; ``row_perm`` is a scatter where the
output is written (the kernels' epilogue stores stored row r at column ``row_perm[r]`` of y).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._checks import DTYPE_CODES, dtype_code, raw_bits, require_2d, require_tensor
from ._native import _C
from .mask import _mask_bytes
from .pattern import Pattern, PatternLike, as_pattern, require_compressible


def layout(pattern: Pattern, R: int, K: int) -> Dict[str, int]:
    """Storage geometry of an R x K matrix (asked of the C++ format definition)."""
    return _C.layout(pattern, int(R), int(K))


def storage_shapes(pattern: Pattern, R: int, K: int) -> Dict[str, Tuple[int, ...]]:
    """Shapes of values, meta and columns for an R x K matrix under ``pattern``."""
    L = layout(pattern, R, K)
    return {
        "values": (L["padded_rows"], L["groups"], 2),
        "meta": (L["padded_rows"], L["meta_cols"]),
        "columns": (L["row_blocks"], L["groups"], 4),
    }


def check_perm(perm: torch.Tensor, K: int, name: str = "perm", what: str = "input column") -> torch.Tensor:
    """``perm`` as an int32 CPU-checked permutation of range(K); ``ValueError`` otherwise."""
    require_tensor(perm, name)
    if perm.dim() != 1 or perm.shape[0] != K:
        raise ValueError(f"{name} must have shape ({K},) (one entry per {what}), got {tuple(perm.shape)}")
    if perm.dtype.is_floating_point or perm.dtype == torch.bool or perm.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {perm.dtype}")
    p = perm.detach().to("cpu", torch.int64)
    if not torch.equal(torch.sort(p).values, torch.arange(K)):
        raise ValueError(f"{name} is not a permutation of 0..{K - 1} (some indices repeat or are out of range)")
    return perm.detach().to(torch.int32)


def check_row_perm(row_perm: torch.Tensor, R: int) -> torch.Tensor:
    """:func:`check_perm` for an output-row permutation of an R-row weight."""
    return check_perm(row_perm, R, "row_perm", "output row")


class VNMTensor:
    """A weight matrix (R x K) in V:N:M (or 2:4) compressed storage.

    Build one with :meth:`from_dense`; multiply with :func:`vnm.spmm`. The constructor takes the
    canonical arrays (e.g. read from a checkpoint) and validates them unless ``validate=False``.
    """

    # pattern_text caches str(pattern): the forward path must not call into the nanobind Pattern,
    # which torch.compile cannot trace. _packed caches the CUDA kernel layout
    # (vnm.cuda_ops.packed_for), built on the first vnm.spmm with CUDA tensors.
    __slots__ = ("values", "meta", "columns", "perm", "row_perm", "pattern", "pattern_text", "shape", "_packed")

    def __init__(
        self,
        values: torch.Tensor,
        meta: torch.Tensor,
        columns: torch.Tensor,
        pattern: PatternLike,
        shape: Tuple[int, int],
        perm: Optional[torch.Tensor] = None,
        *,
        row_perm: Optional[torch.Tensor] = None,
        validate: bool = True,
    ):
        self.pattern = require_compressible(as_pattern(pattern))
        self.pattern_text = str(self.pattern)
        self.shape = torch.Size((int(shape[0]), int(shape[1])))
        self.values, self.meta, self.columns, self.perm = values, meta, columns, perm
        self.row_perm = row_perm
        self._packed = None
        if validate:
            self._validate()

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        mask: torch.Tensor,
        pattern: PatternLike,
        perm: Optional[torch.Tensor] = None,
        row_perm: Optional[torch.Tensor] = None,
    ) -> "VNMTensor":
        """Compress ``weight * mask``.

        ``weight`` (R x K, float32 / float16 / bfloat16) is the stored matrix: its columns in the
        order the layer reads them (with ``perm`` it multiplies ``x[..., perm]``) and its rows in
        stored order (with ``row_perm``, stored row r is the layer's output row ``row_perm[r]``).
        ``mask`` must be valid for ``pattern`` (see :func:`vnm.check_mask`); kept weights must be
        finite.
        """
        p = require_compressible(as_pattern(pattern))
        require_2d(weight, "weight")
        code = dtype_code(weight.dtype, "weight")
        R, K = weight.shape
        require_tensor(mask, "mask")
        if tuple(mask.shape) != (R, K):
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the weight has shape {(R, K)}")
        m = _mask_bytes(mask)
        err = _C.check_mask(m, R, K, p)
        if err:
            raise ValueError(err)
        w = raw_bits(weight.detach().to("cpu"))
        count, row, col = _C.find_nonfinite_kept(w, code, m, R, K)
        if count:
            raise ValueError(
                f"weight has {count} NaN/Inf value(s) at positions the mask keeps, the first at "
                f"(row {row}, column {col}); fix the weight or prune those positions"
            )
        perm32 = None if perm is None else check_perm(perm, K).to(weight.device)
        rows32 = None if row_perm is None else check_row_perm(row_perm, R).to(weight.device)
        shapes = storage_shapes(p, R, K)
        values = torch.empty(shapes["values"], dtype=weight.dtype)
        meta = torch.empty(shapes["meta"], dtype=torch.uint8)
        columns = torch.empty(shapes["columns"], dtype=torch.uint8)
        _C.compress(w, code, m, p, R, K, raw_bits(values), meta, columns)
        dev = weight.device
        return cls(values.to(dev), meta.to(dev), columns.to(dev), p, (R, K), perm32, row_perm=rows32,
                   validate=False)

    # ---- views -------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes of the storage (values, meta, columns and the permutations)."""
        return sum(t.numel() * t.element_size() for t in self.arrays().values())

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the same matrix stored dense in its dtype."""
        return self.shape[0] * self.shape[1] * self.values.element_size()

    def arrays(self) -> Dict[str, torch.Tensor]:
        """The canonical arrays by name (``perm`` and ``row_perm`` only when present)."""
        out = {"values": self.values, "meta": self.meta, "columns": self.columns}
        if self.perm is not None:
            out["perm"] = self.perm
        if self.row_perm is not None:
            out["row_perm"] = self.row_perm
        return out

    def _decompress(self, want_dense: bool, want_mask: bool):
        R, K = self.shape
        dense = torch.empty((R, K), dtype=self.dtype) if want_dense else None
        mask = torch.empty((R, K), dtype=torch.uint8) if want_mask else None
        _C.decompress(
            self.pattern, R, K, dtype_code(self.dtype, "values"),
            raw_bits(self.values.to("cpu")), self.meta.to("cpu").contiguous(),
            self.columns.to("cpu").contiguous(),
            None if dense is None else raw_bits(dense), mask,
        )
        return dense, mask

    def to_dense(self) -> torch.Tensor:
        """The stored R x K matrix, on this tensor's device: ``torch.where(mask, weight, 0)`` of
        :meth:`from_dense`, bit for bit (pruned positions are +0.0, whatever the weight held
        there). With permutations it is in stored order; :meth:`effective_dense` undoes them."""
        dense, _ = self._decompress(True, False)
        return dense.to(self.device)

    def effective_dense(self) -> torch.Tensor:
        """The dense W (R x K) with ``vnm.spmm(self, x) == x @ W.T``: :meth:`to_dense` with
        ``row_perm`` and ``perm`` undone (``W[row_perm[r], perm[k]] = stored[r, k]``)."""
        w = self.to_dense()
        if self.perm is not None:
            out = torch.zeros_like(w)
            out[:, self.perm.long()] = w
            w = out
        if self.row_perm is not None:
            out = torch.zeros_like(w)
            out[self.row_perm.long()] = w
            w = out
        return w

    def mask(self) -> torch.Tensor:
        """Boolean R x K mask of the positions the storage holds (a valid mask for the pattern)."""
        _, mask = self._decompress(False, True)
        return mask.view(torch.bool).to(self.device)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "VNMTensor":
        """A copy on ``device`` and/or with values cast to ``dtype`` (indices unchanged), as
        ``torch.Tensor.to``: ``t.to("cuda")``, ``t.to(torch.float16)``, ``t.to("cuda", torch.float16)``."""
        if isinstance(device, torch.dtype):  # t.to(torch.float16)
            if dtype is not None:
                raise TypeError("VNMTensor.to got two dtypes; pass a device and/or one dtype")
            device, dtype = None, device
        values = self.values
        if dtype is not None and dtype != values.dtype:
            dtype_code(dtype, "target dtype")
            values = values.to(dtype)
            if not bool(torch.isfinite(values).all()):
                raise ValueError(f"casting the values to {dtype} overflows (some kept weights become Inf)")
        if device is not None:
            values = values.to(device)
        dev = values.device
        perm = None if self.perm is None else self.perm.to(dev)
        rows = None if self.row_perm is None else self.row_perm.to(dev)
        return VNMTensor(values, self.meta.to(dev), self.columns.to(dev), self.pattern, self.shape, perm,
                         row_perm=rows, validate=False)

    def __repr__(self) -> str:
        R, K = self.shape
        return (
            f"VNMTensor(shape=({R}, {K}), pattern='{self.pattern}', dtype={self.dtype}, "
            f"device={self.device}, nbytes={self.nbytes} ({self.nbytes / self.dense_nbytes:.3f} of dense)"
            f"{', perm' if self.perm is not None else ''}{', row_perm' if self.row_perm is not None else ''})"
        )

    # ---- validation --------------------------------------------------------------------------

    def _validate(self) -> None:
        R, K = self.shape
        if R <= 0 or K <= 0:
            raise ValueError(f"shape must be positive, got {tuple(self.shape)}")
        shapes = storage_shapes(self.pattern, R, K)
        for name in ("values", "meta", "columns"):
            t = getattr(self, name)
            require_tensor(t, name)
            if tuple(t.shape) != shapes[name]:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}, expected {shapes[name]} for a {R} x {K} "
                    f"matrix in pattern '{self.pattern}'"
                )
        if self.values.dtype not in DTYPE_CODES:
            raise TypeError(f"values has dtype {self.values.dtype}; expected float32, float16 or bfloat16")
        for name in ("meta", "columns"):
            if getattr(self, name).dtype != torch.uint8:
                raise TypeError(f"{name} must be uint8, got {getattr(self, name).dtype}")
        dev = self.values.device
        for name in ("meta", "columns"):
            if getattr(self, name).device != dev:
                raise ValueError(f"{name} is on {getattr(self, name).device} but values on {dev}")
        if self.perm is not None:
            self.perm = check_perm(self.perm, K).to(dev)
        if self.row_perm is not None:
            self.row_perm = check_row_perm(self.row_perm, R).to(dev)
        err = _C.check_storage(self.pattern, R, K, self.meta.to("cpu").contiguous(),
                               self.columns.to("cpu").contiguous())
        if err:
            raise ValueError(err)
        if not bool(torch.isfinite(self.values).all()):
            bad = (~torch.isfinite(self.values)).nonzero()[0].tolist()
            raise ValueError(f"values hold NaN/Inf (first at index {tuple(bad)}); the storage is corrupt")
