"""The packed (``mma.sp`` kernel) layout and the CUDA SpMM.

A :class:`PackedVNM` holds a weight in the layout the CUDA kernels read (``cpp/include/vnm/sp_layout.h``):

=========  =======  ===================  =====================================================
array      dtype    shape                meaning
=========  =======  ===================  =====================================================
values     f16/bf16 [MT, KS, 32, 8]      each lane's 8 A-fragment values per (16-row tile,
                                         k-step of 8 groups): one 16-byte load per lane
meta       int32    [MT, KS, 16]         the mma.sp metadata register of the 16 lanes that
                                         supply it (sparsity selector 0)
kidx       int32    [KB, 8*KS, 4]        x column of each selected column, perm applied
                                         (negative: padding, reads zero); KB = R'/V, or 1 for M = 4
perm       int32    [K] or None          kept only so :func:`unpack` can restore the canonical form
rows       int32    [R] or None          output row of each stored row (the VNMTensor's
                                         ``row_perm``), applied by the kernels' epilogue
=========  =======  ===================  =====================================================

Public API: :func:`pack` (VNMTensor -> PackedVNM, on the tensor's device), :func:`unpack`
(PackedVNM -> VNMTensor, e.g. to save a checkpoint), :func:`spmm_packed` (``x @ W.T + bias``
from the packed form) and :class:`PackedVNM`. ``vnm.spmm(w, x)`` with CUDA tensors packs ``w``
once, caches the packed form on ``w`` and runs the kernel. Every step is a ``torch.library``
custom op with a fake implementation (``vnm::pack``, ``vnm::unpack``, ``vnm::spmm_packed``,
``vnm::packed_to_dense``), so modules holding the packed arrays as buffers work under
``torch.compile`` and CUDA graphs. CPU tensors run the same ops through the C++ reference.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._checks import DTYPE_CODES, check_spmm_inputs, raw_bits, require_tensor
from ._native import CUDA_BUILT, _C
from .pattern import Pattern, PatternLike, as_pattern, require_compressible
from .tensor import VNMTensor, check_perm, storage_shapes

__all__ = ["PackedVNM", "pack", "unpack", "spmm_packed", "packed_for", "packed_shapes"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


# ---- geometry (pure Python: fake implementations must not call into nanobind objects) --------

def _pattern_numbers(pattern: str) -> Tuple[int, int]:
    """(row block, M) of a pattern's text ('64:2:8' -> (64, 8); '2:4' -> (16, 4))."""
    parts = [int(p) for p in pattern.split(":")]
    if len(parts) == 3:
        return parts[0], parts[2]
    return 16, parts[1]


def packed_shapes(pattern: str, R: int, K: int) -> Dict[str, Tuple[int, ...]]:
    """Shapes of the packed arrays of an R x K weight (mirrors ``vnm::packed_geom``)."""
    V, M = _pattern_numbers(pattern)
    Rp = -(-R // V) * V
    G = -(-K // M)
    MT, KS = Rp // 16, -(-G // 8)
    KB = 1 if M == 4 else Rp // V
    return {"values": (MT, KS, 32, 8), "meta": (MT, KS, 16), "kidx": (KB, 8 * KS, 4)}


# ---- helpers -----------------------------------------------------------------------------------

def _require_cuda_build() -> None:
    if not CUDA_BUILT:
        raise RuntimeError(
            "vnm was built without CUDA (no nvcc found when it was compiled), so CUDA tensors "
            "cannot run its kernels. Reinstall with the CUDA toolkit on PATH "
            "(`pip install --no-build-isolation .`), or move the tensors to the CPU."
        )


def _require_kernel_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{what} is {dtype}, but vnm's CUDA kernels (mma.sp) take torch.float16 or "
            f"torch.bfloat16: cast with .half() or .bfloat16(), or run on CPU tensors (the C++ "
            f"reference also supports float32)"
        )


def _dl(t: Optional[torch.Tensor]):
    """A DLPack capsule that does not synchronise with the legacy default stream (stream=-1)."""
    return None if t is None else t.detach().__dlpack__(stream=-1)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _i16(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _same_device(device: torch.device, **tensors: Optional[torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the other arrays are on {device}; move it with .to({str(device)!r})")


# ---- custom ops --------------------------------------------------------------------------------

@torch.library.custom_op("vnm::pack", mutates_args=())
def _pack_op(
    values: torch.Tensor,
    meta: torch.Tensor,
    columns: torch.Tensor,
    perm: Optional[torch.Tensor],
    pattern: str,
    R: int,
    K: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _require_kernel_dtype(values.dtype, "the weight")
    shapes = packed_shapes(pattern, R, K)
    dev = values.device
    _same_device(dev, meta=meta, columns=columns, perm=perm)
    values_p = torch.empty(shapes["values"], dtype=values.dtype, device=dev)
    meta_p = torch.empty(shapes["meta"], dtype=torch.int32, device=dev)
    kidx = torch.empty(shapes["kidx"], dtype=torch.int32, device=dev)
    p = Pattern.parse(pattern)
    if dev.type == "cuda":
        _require_cuda_build()
        _C.cuda_pack(
            p, R, K, _dl(values.contiguous()), _dl(meta.contiguous()), _dl(columns.contiguous()),
            _dl(None if perm is None else perm.contiguous()), _dl(values_p), _dl(meta_p), _dl(kidx),
            dev.index, _stream(dev),
        )
    else:
        _C.pack(
            p, R, K, _i16(values), meta.contiguous(), columns.contiguous(),
            None if perm is None else perm.contiguous(), values_p.view(torch.int16), meta_p, kidx,
        )
    return values_p, meta_p, kidx


@_pack_op.register_fake
def _(values, meta, columns, perm, pattern, R, K):
    shapes = packed_shapes(pattern, R, K)
    return (
        values.new_empty(shapes["values"]),
        values.new_empty(shapes["meta"], dtype=torch.int32),
        values.new_empty(shapes["kidx"], dtype=torch.int32),
    )


@torch.library.custom_op("vnm::unpack", mutates_args=())
def _unpack_op(
    values_p: torch.Tensor,
    meta_p: torch.Tensor,
    kidx: torch.Tensor,
    perm: Optional[torch.Tensor],
    pattern: str,
    R: int,
    K: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = Pattern.parse(pattern)
    shapes = storage_shapes(p, R, K)
    dev = values_p.device
    _same_device(dev, meta_p=meta_p, kidx=kidx, perm=perm)
    values = torch.empty(shapes["values"], dtype=values_p.dtype, device=dev)
    meta = torch.empty(shapes["meta"], dtype=torch.uint8, device=dev)
    columns = torch.empty(shapes["columns"], dtype=torch.uint8, device=dev)
    inv = None
    if perm is not None:
        inv = torch.empty_like(perm, dtype=torch.int32)
        inv[perm.long()] = torch.arange(K, dtype=torch.int32, device=dev)
    if dev.type == "cuda":
        _require_cuda_build()
        _C.cuda_unpack(
            p, R, K, _dl(values_p.contiguous()), _dl(meta_p.contiguous()), _dl(kidx.contiguous()),
            _dl(inv), _dl(values), _dl(meta), _dl(columns), dev.index, _stream(dev),
        )
    else:
        _C.unpack(
            p, R, K, _i16(values_p), meta_p.contiguous(), kidx.contiguous(), inv,
            values.view(torch.int16), meta, columns,
        )
    return values, meta, columns


@_unpack_op.register_fake
def _(values_p, meta_p, kidx, perm, pattern, R, K):
    V, M = _pattern_numbers(pattern)
    Rp, G = -(-R // V) * V, -(-K // M)
    return (
        values_p.new_empty((Rp, G, 2)),
        values_p.new_empty((Rp, -(-G // 2)), dtype=torch.uint8),
        values_p.new_empty((Rp // V, G, 4), dtype=torch.uint8),
    )


def _check_packed_dtypes(x: torch.Tensor, values_p, meta_p, kidx, rows, bias, y) -> None:
    # The bindings see raw 16-bit words: a bf16 weight under fp16 x would be misread, not rejected.
    if values_p.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but the packed weight is {values_p.dtype}; cast x with x.to({values_p.dtype})")
    for name, t in (("bias", bias), ("y", y)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} is {t.dtype} but x is {x.dtype}; cast it with .to({x.dtype})")
    for name, t in (("packed meta", meta_p), ("packed kidx", kidx), ("rows", rows)):
        if t is not None and t.dtype != torch.int32:
            raise TypeError(f"{name} must be torch.int32, got {t.dtype} (use the arrays vnm.cuda_ops.pack returns)")


def transpose_x(x: torch.Tensor) -> torch.Tensor:
    """``x`` (n x K) as the tiled kernel's gathered path reads it: k-major, ``K x ldxt`` with
    ``ldxt`` = n rounded up to a multiple of 8 (padding zero), so every kept column of x is one
    contiguous run of tokens copied 16 bytes at a time. One pass over x; layers that read the
    same x (q/k/v, gate/up) can share one (``_spmm_packed_into(..., xt=...)``)."""
    n = x.shape[0]
    pad = -n % 8
    xt = x.t() if pad == 0 else torch.nn.functional.pad(x.t(), (0, pad))
    return xt.contiguous()


def _spmm_packed_into(
    x: torch.Tensor,
    values_p: torch.Tensor,
    meta_p: torch.Tensor,
    kidx: torch.Tensor,
    bias: Optional[torch.Tensor],
    pattern: str,
    R: int,
    K: int,
    has_perm: bool,
    y: torch.Tensor,
    path: int = 0,
    force_gather: bool = False,
    rows: Optional[torch.Tensor] = None,
    xt: Optional[torch.Tensor] = None,
    decode_splits: int = 0,
) -> torch.Tensor:
    """Writes ``x @ W.T (+ bias)`` into ``y`` (n x R, contiguous); with ``rows`` stored row r goes
    to column ``rows[r]`` of y. ``has_perm`` must say whether ``kidx`` was packed with a ``perm``
    (for M = 4 without one the kernel reads x without a gather). ``path`` / ``force_gather`` pick
    a kernel on CUDA for tests (0 automatic, 1 decode, 2 tiled), ``decode_splits`` the decode
    kernel's k splits (0: its own choice, a function of the shape only). ``xt``:
    ``transpose_x(x)`` when the caller already has it (shared by the layers reading the same x);
    made here otherwise, where the tiled kernel gathers (N > 32 with M > 4, a perm, or an x it
    cannot read directly)."""
    _require_kernel_dtype(x.dtype, "x")
    _same_device(x.device, values_p=values_p, meta_p=meta_p, kidx=kidx, rows=rows, bias=bias, y=y)
    _check_packed_dtypes(x, values_p, meta_p, kidx, rows, bias, y)
    n = x.shape[0]
    if n == 0:
        return y
    p = Pattern.parse(pattern)
    code = DTYPE_CODES[x.dtype]
    if x.device.type == "cuda":
        _require_cuda_build()
        needs_xt = _C.cuda_plan(p, R, K, n, has_perm, path, force_gather, x.data_ptr() % 16 == 0)[3]
        if needs_xt and xt is None:
            xt = transpose_x(x)
        if xt is not None and (xt.dim() != 2 or xt.shape[0] != K or xt.shape[1] < n or xt.shape[1] % 8
                               or not xt.is_contiguous()):
            raise ValueError(f"xt has shape {tuple(xt.shape)}; pass vnm.cuda_ops.transpose_x(x) (K x n rounded up to 8)")
        if xt is not None and (xt.dtype != x.dtype or xt.device != x.device):
            raise TypeError(f"xt is {xt.dtype} on {xt.device} but x is {x.dtype} on {x.device}; "
                            "pass vnm.cuda_ops.transpose_x(x)")
        # The decode kernel's split-K partials (fp32), from torch's stream-ordered caching
        # allocator: no cudaMalloc per call, and CUDA-graph capture takes it from its pool.
        ws_floats = _C._spmm_workspace_floats(p, R, K, n, path, decode_splits)
        ws = torch.empty(ws_floats, dtype=torch.float32, device=x.device) if ws_floats else None
        _C.cuda_spmm(
            p, R, K, code, _dl(values_p), _dl(meta_p), _dl(kidx), has_perm,
            _dl(None if rows is None else rows.contiguous()), _dl(x), n, _dl(bias), _dl(y),
            x.device.index, _stream(x.device), path, force_gather,
            _dl(xt if needs_xt else None), xt.shape[1] if needs_xt else 0, _dl(ws), decode_splits,
        )
    else:
        _C.spmm_packed(
            p, R, K, code, _i16(values_p), meta_p.contiguous(), kidx.contiguous(),
            None if rows is None else rows.contiguous(), _i16(x), n,
            None if bias is None else _i16(bias), y.view(torch.int16),
        )
    return y


@torch.library.custom_op("vnm::spmm_packed", mutates_args=())
def _spmm_packed_op(
    x: torch.Tensor,
    values_p: torch.Tensor,
    meta_p: torch.Tensor,
    kidx: torch.Tensor,
    rows: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    pattern: str,
    R: int,
    K: int,
    has_perm: bool,
    xt: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty((x.shape[0], R), dtype=x.dtype, device=x.device)
    return _spmm_packed_into(
        x, values_p.contiguous(), meta_p.contiguous(), kidx.contiguous(),
        None if bias is None else bias.contiguous(), pattern, R, K, has_perm, y, rows=rows, xt=xt,
    )


@_spmm_packed_op.register_fake
def _(x, values_p, meta_p, kidx, rows, bias, pattern, R, K, has_perm, xt=None):
    return x.new_empty((x.shape[0], R))


@torch.library.custom_op("vnm::packed_to_dense", mutates_args=())
def _packed_to_dense_op(
    values_p: torch.Tensor, meta_p: torch.Tensor, kidx: torch.Tensor, pattern: str, R: int, K: int
) -> torch.Tensor:
    _require_kernel_dtype(values_p.dtype, "the packed weight")
    _same_device(values_p.device, meta_p=meta_p, kidx=kidx)
    dense = torch.zeros((R, K), dtype=values_p.dtype, device=values_p.device)
    p = Pattern.parse(pattern)
    if values_p.device.type == "cuda":
        _require_cuda_build()
        dev = values_p.device
        _C.cuda_packed_to_dense(
            p, R, K, _dl(values_p.contiguous()), _dl(meta_p.contiguous()), _dl(kidx.contiguous()),
            _dl(dense), dev.index, _stream(dev),
        )
    else:
        _C.packed_to_dense(
            p, R, K, DTYPE_CODES[values_p.dtype], _i16(values_p), meta_p.contiguous(),
            kidx.contiguous(), dense.view(torch.int16),
        )
    return dense


@_packed_to_dense_op.register_fake
def _(values_p, meta_p, kidx, pattern, R, K):
    return values_p.new_empty((R, K))


def _spmm_packed_setup_context(ctx, inputs, output):
    x, values_p, meta_p, kidx, rows, bias, pattern, R, K, has_perm, xt = inputs
    ctx.save_for_backward(values_p, meta_p, kidx, rows)
    ctx.meta_args = (pattern, R, K, bias is not None)


def _spmm_packed_backward(ctx, grad_y):
    # dL/dx = grad_y[:, rows] @ D with D the dense weight in stored row order and x's column order
    # (kidx already holds perm); the weight is frozen (inference layout), so only x and bias get
    # gradients.
    values_p, meta_p, kidx, rows = ctx.saved_tensors
    pattern, R, K, has_bias = ctx.meta_args
    dense = _packed_to_dense_op(values_p, meta_p, kidx, pattern, R, K)
    grad_stored = grad_y if rows is None else grad_y.index_select(1, rows.long())
    grad_x = grad_stored @ dense
    grad_bias = grad_y.sum(0) if has_bias else None
    return grad_x, None, None, None, None, grad_bias, None, None, None, None, None


_spmm_packed_op.register_autograd(_spmm_packed_backward, setup_context=_spmm_packed_setup_context)


# ---- public API --------------------------------------------------------------------------------

class PackedVNM:
    """A V:N:M weight (R x K) in the packed layout of the CUDA kernels (see the module doc).

    Build one with :func:`pack`; multiply with :func:`spmm_packed`; get the canonical storage
    back with :func:`unpack`. A module can hold ``values``, ``meta``, ``kidx`` (and ``perm``,
    ``rows``) as buffers and call ``torch.ops.vnm.spmm_packed`` itself.
    """

    __slots__ = ("values", "meta", "kidx", "perm", "rows", "pattern", "pattern_text", "shape")

    def __init__(
        self,
        values: torch.Tensor,
        meta: torch.Tensor,
        kidx: torch.Tensor,
        pattern: PatternLike,
        shape: Tuple[int, int],
        perm: Optional[torch.Tensor] = None,
        *,
        rows: Optional[torch.Tensor] = None,
        validate: bool = True,
    ):
        self.pattern = require_compressible(as_pattern(pattern))
        self.pattern_text = str(self.pattern)
        self.shape = torch.Size((int(shape[0]), int(shape[1])))
        self.values, self.meta, self.kidx, self.perm = values, meta, kidx, perm
        self.rows = rows
        if validate:
            self._validate()

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def has_perm(self) -> bool:
        return self.perm is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the packed arrays (perm and rows included)."""
        return sum(t.numel() * t.element_size() for t in self.arrays().values())

    def arrays(self) -> Dict[str, torch.Tensor]:
        out = {"values": self.values, "meta": self.meta, "kidx": self.kidx}
        if self.perm is not None:
            out["perm"] = self.perm
        if self.rows is not None:
            out["rows"] = self.rows
        return out

    def to(self, device) -> "PackedVNM":
        """A copy on ``device`` (the layout is the same on every device)."""
        return PackedVNM(
            self.values.to(device), self.meta.to(device), self.kidx.to(device), self.pattern,
            self.shape, None if self.perm is None else self.perm.to(device),
            rows=None if self.rows is None else self.rows.to(device), validate=False,
        )

    def unpack(self) -> VNMTensor:
        return unpack(self)

    def _validate(self) -> None:
        R, K = self.shape
        shapes = packed_shapes(self.pattern_text, R, K)
        for name, dtype in (("values", None), ("meta", torch.int32), ("kidx", torch.int32)):
            t = getattr(self, name)
            require_tensor(t, name)
            if tuple(t.shape) != shapes[name]:
                raise ValueError(
                    f"packed {name} has shape {tuple(t.shape)}, expected {shapes[name]} for a "
                    f"{R} x {K} matrix in pattern '{self.pattern}'"
                )
            if dtype is not None and t.dtype != dtype:
                raise TypeError(f"packed {name} must be {dtype}, got {t.dtype}")
            if t.device != self.values.device:
                raise ValueError(f"packed {name} is on {t.device} but values on {self.values.device}")
        _require_kernel_dtype(self.values.dtype, "the packed values")
        if self.perm is not None:
            self.perm = check_perm(self.perm, K).to(self.values.device)
        if self.rows is not None:
            self.rows = check_perm(self.rows, R, "rows", "output row").to(self.values.device)

    def __repr__(self) -> str:
        R, K = self.shape
        return (
            f"PackedVNM(shape=({R}, {K}), pattern='{self.pattern}', dtype={self.dtype}, "
            f"device={self.device}, nbytes={self.nbytes}{', perm' if self.perm is not None else ''}"
            f"{', rows' if self.rows is not None else ''})"
        )


def pack(w: VNMTensor) -> PackedVNM:
    """The packed (kernel) form of ``w``, on ``w``'s device (GPU kernels for CUDA tensors, C++
    for CPU). ``w`` must be float16 or bfloat16."""
    if not isinstance(w, VNMTensor):
        raise TypeError(f"pack takes a vnm.VNMTensor, got {type(w).__name__}")
    _require_kernel_dtype(w.dtype, "the weight")
    R, K = w.shape
    values_p, meta_p, kidx = _pack_op(w.values, w.meta, w.columns, w.perm, w.pattern_text, R, K)
    return PackedVNM(values_p, meta_p, kidx, w.pattern, (R, K), w.perm, rows=w.row_perm, validate=False)


def unpack(p: PackedVNM) -> VNMTensor:
    """The canonical :class:`VNMTensor` of a packed weight (bit-exact inverse of :func:`pack`)."""
    if not isinstance(p, PackedVNM):
        raise TypeError(f"unpack takes a vnm.cuda_ops.PackedVNM, got {type(p).__name__}")
    R, K = p.shape
    values, meta, columns = _unpack_op(p.values, p.meta, p.kidx, p.perm, p.pattern_text, R, K)
    return VNMTensor(values, meta, columns, p.pattern, (R, K), p.perm, row_perm=p.rows, validate=False)


def packed_for(w: VNMTensor) -> PackedVNM:
    """``pack(w)``, computed once and cached on ``w`` (the cache assumes ``w``'s arrays are not
    modified in place; :meth:`VNMTensor.to` returns a new tensor without the cache)."""
    cached = w._packed
    if cached is None or cached.device != w.device:
        cached = pack(w)
        w._packed = cached
    return cached


def spmm_packed(p: PackedVNM, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                xt: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for ``x`` of shape ``(..., K)`` from the packed weight (fp32
    accumulation, output in ``x``'s dtype). ``xt``: ``transpose_x(x.reshape(-1, K))``, made once
    and passed to every layer that reads the same x (q/k/v, gate/up) so that the CUDA tiled
    kernel's gathered path does not transpose x again; ignored where it is not needed."""
    if not isinstance(p, PackedVNM):
        raise TypeError(f"spmm_packed takes a vnm.cuda_ops.PackedVNM, got {type(p).__name__}")
    R, K = p.shape
    check_spmm_inputs(x, p.values, bias, R, K)
    lead = x.shape[:-1]
    y = _spmm_packed_op(x.reshape(-1, K), p.values, p.meta, p.kidx, p.rows, bias, p.pattern_text, R, K,
                        p.has_perm, xt)
    return y.reshape(*lead, R)


def spmm_cuda(x, values, meta, columns, perm, row_perm, bias, pattern, R, K, y):
    """CUDA branch of ``vnm::spmm`` (canonical arrays): packs into temporaries, then runs the
    kernel into ``y``. ``vnm.spmm`` avoids the packing by caching it on the VNMTensor."""
    _require_cuda_build()
    _require_kernel_dtype(x.dtype, "x")
    values_p, meta_p, kidx = _pack_op(values, meta, columns, perm, pattern, R, K)
    return _spmm_packed_into(
        x.contiguous(), values_p, meta_p, kidx, None if bias is None else bias.contiguous(),
        pattern, R, K, perm is not None, y, rows=row_perm,
    )
