"""``vnm.spmm``: y = x @ W.T (+ bias) with W in V:N:M storage.

The work is a ``torch.library`` custom op with a fake implementation, so it runs under
``torch.compile`` and inside CUDA graphs. CPU tensors go to the C++ reference (``vnm::spmm``);
CUDA tensors to the ``mma.sp`` kernel (``vnm::spmm_packed``, see ``vnm.cuda_ops``) on the packed
layout, built once per VNMTensor and cached on it.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import cuda_ops
from ._checks import DTYPE_CODES, check_spmm_inputs, raw_bits
from ._native import _C
from .pattern import Pattern
from .tensor import VNMTensor


def _storage_dense(values, meta, columns, pattern: str, R: int, K: int) -> torch.Tensor:
    p = Pattern.parse(pattern)
    w = VNMTensor(values, meta, columns, p, (R, K), validate=False)
    return w.to_dense()


@torch.library.custom_op("vnm::to_dense", mutates_args=())
def _to_dense_op(
    values: torch.Tensor, meta: torch.Tensor, columns: torch.Tensor, pattern: str, R: int, K: int
) -> torch.Tensor:
    return _storage_dense(values, meta, columns, pattern, R, K)


@_to_dense_op.register_fake
def _(values, meta, columns, pattern, R, K):
    return values.new_empty((R, K))


@torch.library.custom_op("vnm::spmm", mutates_args=())
def _spmm_op(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    columns: torch.Tensor,
    perm: Optional[torch.Tensor],
    row_perm: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    pattern: str,
    R: int,
    K: int,
) -> torch.Tensor:
    n = x.shape[0]
    y = torch.empty((n, R), dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    if x.device.type == "cuda":
        return cuda_ops.spmm_cuda(x, values, meta, columns, perm, row_perm, bias, pattern, R, K, y)
    _C.spmm(
        Pattern.parse(pattern), R, K, DTYPE_CODES[x.dtype], raw_bits(values), meta.contiguous(),
        columns.contiguous(), None if perm is None else perm.contiguous(),
        None if row_perm is None else row_perm.contiguous(), raw_bits(x), n,
        None if bias is None else raw_bits(bias), raw_bits(y),
    )
    return y


@_spmm_op.register_fake
def _(x, values, meta, columns, perm, row_perm, bias, pattern, R, K):
    return x.new_empty((x.shape[0], R))


def _spmm_setup_context(ctx, inputs, output):
    x, values, meta, columns, perm, row_perm, bias, pattern, R, K = inputs
    ctx.save_for_backward(values, meta, columns, perm, row_perm)
    ctx.meta_args = (pattern, R, K, bias is not None)


def _spmm_backward(ctx, grad_y):
    # y[:, row_perm] = x[:, perm] @ S.T for the stored matrix S, so dL/dx = grad_y[:, row_perm] @ S
    # scattered back through perm. The weight is frozen, so only x and bias get gradients. The
    # backward densifies S once; training with trainable weights uses dense masked weights
    # (vnm.train), not this op.
    values, meta, columns, perm, row_perm = ctx.saved_tensors
    pattern, R, K, has_bias = ctx.meta_args
    dense = _to_dense_op(values, meta, columns, pattern, R, K)
    grad_stored = grad_y if row_perm is None else grad_y.index_select(1, row_perm.long())
    grad_xp = grad_stored @ dense
    if perm is None:
        grad_x = grad_xp
    else:
        grad_x = torch.empty_like(grad_xp).index_copy_(1, perm.long(), grad_xp)
    grad_bias = grad_y.sum(0) if has_bias else None
    return grad_x, None, None, None, None, None, grad_bias, None, None, None


_spmm_op.register_autograd(_spmm_backward, setup_context=_spmm_setup_context)


def spmm(w: VNMTensor, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for ``x`` of shape ``(..., K)``, straight from the compressed storage.

    fp32 accumulation, output in ``x``'s dtype. With ``w.perm`` the stored matrix multiplies
    ``x[..., perm]``; with ``w.row_perm`` stored row r is written to output column
    ``row_perm[r]`` (``bias`` is in output order). ``x``, ``bias`` and ``w`` must share dtype and
    device. On a GPU the ``mma.sp`` kernel reads a packed layout: it is built on the first call and
    cached on ``w``.
    """
    if not isinstance(w, VNMTensor):
        raise TypeError(f"w must be a vnm.VNMTensor (see VNMTensor.from_dense), got {type(w).__name__}")
    R, K = w.shape
    check_spmm_inputs(x, w.values, bias, R, K)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    if x2.device.type == "cuda":
        cuda_ops._require_kernel_dtype(x2.dtype, "x")
        cuda_ops._require_cuda_build()
        p = cuda_ops.packed_for(w)
        y = torch.ops.vnm.spmm_packed(x2, p.values, p.meta, p.kidx, p.rows, bias, w.pattern_text, R, K,
                                      p.has_perm)
    else:
        y = _spmm_op(x2, w.values, w.meta, w.columns, w.perm, w.row_perm, bias, w.pattern_text, R, K)
    return y.reshape(*lead, R)


def spmm_storage(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    columns: torch.Tensor,
    perm: Optional[torch.Tensor],
    row_perm: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    pattern: str,
    R: int,
    K: int,
) -> torch.Tensor:
    """:func:`spmm` on the canonical arrays of an R x K matrix, through the ``vnm::spmm`` op (on
    a GPU that op packs into temporaries on every call: modules keep the packed form instead)."""
    check_spmm_inputs(x, values, bias, R, K)
    lead = x.shape[:-1]
    y = _spmm_op(x.reshape(-1, K).contiguous(), values, meta, columns, perm, row_perm, bias, pattern, R, K)
    return y.reshape(*lead, R)
