"""``VNMWeight``: the weight of a sparse linear layer as a ``torch.Tensor`` that knows how to multiply.

Code written for dense models reads ``linear.weight`` (T5's feed-forward casts to
``wo.weight.dtype``; PEFT reads its device and dtype; accelerate moves it). A :class:`VNMWeight`
answers those reads like the dense weight would (``dtype``, ``shape``, ``device``, ``ndim``,
``.to()``, ``.half()``, ``.detach()``, ``.t()``) while holding only the V:N:M storage, and routes the
products a linear layer makes to :func:`vnm.spmm`:

* ``F.linear(x, w, b)`` (``nn.Linear.forward``) is caught in ``__torch_function__`` and runs the
  ``vnm::spmm`` op (``vnm::spmm_packed`` on a GPU), never materialising ``w``;
* below autograd, ``__torch_dispatch__`` serves ``aten.t`` / ``transpose`` (a flag),
  ``aten.mm(x, w.t())``, ``aten.addmm(b, x, w.t())`` and ``aten.mm(w, x)`` from the storage; the
  products with the *untransposed* weight on the right (``x @ w``, what the backward of
  ``x @ w.t()`` computes) densify it once, as the op's own backward does;
* ``.to()`` / ``.cuda()`` / ``.half()`` convert the storage (values take the dtype, indices stay
  ``uint8`` / ``int32``) and, on a CUDA device in float16 or bfloat16, build the packed kernel
  layout once (:func:`vnm.cuda_ops.pack`), so a forward never packs;
* every other op raises ``NotImplementedError`` naming :meth:`VNMWeight.to_dense`: the dense
  matrix exists only when asked for.

It is a wrapper subclass in torchao's style (``_make_wrapper_subclass``; ``__tensor_flatten__`` /
``__tensor_unflatten__``), so ``torch.compile`` traces through it: the inner tensors are the
canonical arrays of :class:`vnm.VNMTensor` (``values``, ``meta``, ``columns``, optional ``perm``
and ``row_perm``) plus, on a GPU, the packed arrays. The tensor's value is the layer's effective
weight ``W`` (R x K, ``y = x @ W.T``), permutations included: ``to_dense()`` equals
``VNMTensor.effective_dense()``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import cuda_ops
from ._checks import DTYPE_CODES, check_spmm_inputs
from .ops import _to_dense_op, spmm_storage
from .tensor import VNMTensor

aten = torch.ops.aten

_STORAGE = ("values", "meta", "columns", "perm", "row_perm")
_PACKED = ("packed_values", "packed_meta", "packed_kidx")


class VNMWeight(torch.Tensor):
    """An R x K linear weight in V:N:M storage that behaves as a tensor where a layer needs one.

    Build one with :meth:`from_vnm_tensor` (or get it from ``VNMLinear.weight``). The storage is
    ``vnm`` (a :class:`vnm.VNMTensor` sharing the arrays); :meth:`to_dense` materialises the dense
    matrix on request. ``transposed`` marks the ``w.t()`` view (shape K x R) that ``aten.linear``
    decomposes into.
    """

    values: torch.Tensor
    meta: torch.Tensor
    columns: torch.Tensor
    perm: Optional[torch.Tensor]
    row_perm: Optional[torch.Tensor]
    packed_values: Optional[torch.Tensor]
    packed_meta: Optional[torch.Tensor]
    packed_kidx: Optional[torch.Tensor]

    @staticmethod
    def __new__(cls, arrays, pattern_text: str = "", R: int = 0, K: int = 0, transposed: bool = False,
                requires_grad: bool = False):
        if isinstance(arrays, torch.Tensor):
            # VNMWeight(w, requires_grad=False): re-wrap as a frozen parameter, the way
            # nn.Parameter(w) does (accelerate rebuilds a parameter through its class).
            if not isinstance(arrays, VNMWeight):
                raise TypeError("a VNMWeight is built from V:N:M storage (VNMWeight.from_vnm_tensor), not from a "
                                f"dense {type(arrays).__name__}: to load weights into a VNMLinear use vnm.load or "
                                "load_state_dict with its values/meta/columns")
            if requires_grad:
                raise ValueError("a VNMWeight is frozen (requires_grad=False): train adapters (PEFT) or use vnm.train")
            out = arrays._with(lambda t: t)
            out._is_param = True
            return out
        values = arrays["values"]
        shape = (K, R) if transposed else (R, K)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=values.dtype, device=values.device,
                                                   requires_grad=False)

    def __init__(self, arrays, pattern_text: str = "", R: int = 0, K: int = 0, transposed: bool = False,
                 requires_grad: bool = False):
        if isinstance(arrays, torch.Tensor):
            return  # the re-wrap of __new__, already built
        for name in _STORAGE + _PACKED:
            setattr(self, name, arrays.get(name))
        self.pattern_text, self.R, self.K, self.transposed = pattern_text, int(R), int(K), bool(transposed)

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_vnm_tensor(cls, t: VNMTensor) -> "VNMWeight":
        """The weight around ``t``'s arrays (shared, not copied). On a CUDA device in float16 or
        bfloat16 the packed kernel layout is built here, once."""
        if not isinstance(t, VNMTensor):
            raise TypeError(f"VNMWeight.from_vnm_tensor takes a vnm.VNMTensor, got {type(t).__name__}")
        arrays: Dict[str, Optional[torch.Tensor]] = dict(t.arrays())
        if t.device.type == "cuda" and t.dtype in cuda_ops.KERNEL_DTYPES:
            p = cuda_ops.packed_for(t)
            arrays.update(packed_values=p.values, packed_meta=p.meta, packed_kidx=p.kidx)
        R, K = t.shape
        return cls(arrays, t.pattern_text, R, K)

    def _arrays(self) -> Dict[str, Optional[torch.Tensor]]:
        return {name: getattr(self, name) for name in _STORAGE + _PACKED}

    def _with(self, fn: Callable[[torch.Tensor], torch.Tensor], transposed: Optional[bool] = None) -> "VNMWeight":
        """A weight of the same structure with ``fn`` applied to every inner tensor."""
        arrays = {k: None if v is None else fn(v) for k, v in self._arrays().items()}
        return VNMWeight(arrays, self.pattern_text, self.R, self.K,
                         self.transposed if transposed is None else transposed)

    # ---- torch.compile: the tensor as its inner tensors plus constants --------------------------

    def __tensor_flatten__(self) -> Tuple[List[str], tuple]:
        names = [n for n in _STORAGE + _PACKED if getattr(self, n) is not None]
        return names, (self.pattern_text, self.R, self.K, self.transposed)

    @staticmethod
    def __tensor_unflatten__(inner: Dict[str, torch.Tensor], ctx: tuple, outer_size, outer_stride) -> "VNMWeight":
        pattern_text, R, K, transposed = ctx
        return VNMWeight(dict(inner), pattern_text, R, K, transposed)

    def _stable_hash_for_caching(self) -> str:
        """What the compiled graph depends on besides the inner tensors' metadata (AOT autograd's cache)."""
        names, ctx = self.__tensor_flatten__()
        return f"VNMWeight:{ctx}:{','.join(names)}"

    # ---- views of the storage ----------------------------------------------------------------

    @property
    def vnm(self) -> VNMTensor:
        """The storage as a :class:`vnm.VNMTensor` (shares the arrays; the untransposed R x K matrix)."""
        t = VNMTensor(self.values, self.meta, self.columns, self.pattern_text, (self.R, self.K), self.perm,
                      row_perm=self.row_perm, validate=False)
        t._packed = self.packed()
        return t

    def packed(self) -> Optional["cuda_ops.PackedVNM"]:
        """The packed kernel layout held for a CUDA device (None on the CPU or in float32)."""
        if self.packed_values is None:
            return None
        return cuda_ops.PackedVNM(self.packed_values, self.packed_meta, self.packed_kidx, self.pattern_text,
                                  (self.R, self.K), self.perm, rows=self.row_perm, validate=False)

    def to_dense(self) -> torch.Tensor:  # type: ignore[override]
        """The dense matrix this tensor stands for (a new plain tensor, pruned entries +0.0): the
        layer's effective weight ``W`` (``x @ W.T`` is the layer without bias), transposed for a
        ``w.t()`` view."""
        w = self.vnm.effective_dense()
        return w.T.contiguous() if self.transposed else w

    @property
    def storage_nbytes(self) -> int:
        """Bytes of the canonical storage (values, meta, columns, permutations)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.meta, self.columns, self.perm,
                                                          self.row_perm) if t is not None)

    def __repr__(self, *, tensor_contents=None) -> str:  # printing must not densify
        return (f"VNMWeight(shape={tuple(self.shape)}, pattern='{self.pattern_text}', dtype={self.dtype}, "
                f"device={self.device}{', transposed' if self.transposed else ''}"
                f"{', perm' if self.perm is not None else ''}{', row_perm' if self.row_perm is not None else ''})")

    # ---- products ----------------------------------------------------------------------------

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``F.linear(x, self, bias)`` = ``x @ W.T + bias`` from the storage (``self`` untransposed)."""
        R, K = self.R, self.K
        if x.is_cuda and self.packed_values is not None:
            check_spmm_inputs(x, self.values, bias, R, K)
            lead = x.shape[:-1]
            y = torch.ops.vnm.spmm_packed(x.reshape(-1, K).contiguous(), self.packed_values, self.packed_meta,
                                          self.packed_kidx, self.row_perm, bias, self.pattern_text, R, K,
                                          self.perm is not None)
            return y.reshape(*lead, R)
        return spmm_storage(x, self.values, self.meta, self.columns, self.perm, self.row_perm, bias,
                            self.pattern_text, R, K)

    def _dense_op(self) -> torch.Tensor:
        """The effective dense weight (R x K, untransposed) through the ``vnm::to_dense`` op, so that
        the rare products that need it stay traceable."""
        w = _to_dense_op(self.values, self.meta, self.columns, self.pattern_text, self.R, self.K)
        if self.perm is not None:
            w = torch.zeros_like(w).index_copy_(1, self.perm.long(), w)
        if self.row_perm is not None:
            w = torch.zeros_like(w).index_copy_(0, self.row_perm.long(), w)
        return w

    # ---- torch function / dispatch -----------------------------------------------------------

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, VNMWeight) and not w.transposed and not isinstance(x, VNMWeight) and \
                    not isinstance(bias, VNMWeight):
                return w.linear(x, bias)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None and func._schema.is_mutable:
            raise NotImplementedError(
                f"vnm.VNMWeight is compressed V:N:M storage and cannot be changed in place ({func}). Merging a "
                "low-rank update into it (PEFT's merge_and_unload / merge_adapter) would give W + BA, which is not "
                "V:N:M sparse: keep the adapter unmerged, or recover with vnm.train (prepare_lora, "
                "train_three_stage, merge), which folds (W + BA) * mask back into V:N:M storage")
        if handler is None:
            raise NotImplementedError(
                f"vnm.VNMWeight (a V:N:M sparse weight) does not implement {func}: it multiplies "
                "(F.linear, x @ w.t(), torch.mm, torch.addmm) and converts (.to, .half, .detach, .clone, .t) "
                "without densifying. For anything else take a dense copy with weight.to_dense()")
        return handler(func, args, kwargs)


# ---- aten handlers --------------------------------------------------------------------------------

_HANDLERS: Dict[object, Callable] = {}


def _implements(*ops):
    def register(fn):
        for op in ops:
            _HANDLERS[op] = fn
        return fn
    return register


@_implements(aten.detach.default, aten.alias.default)
def _detach(func, args, kwargs):
    return args[0]._with(lambda t: func(t))


@_implements(aten.clone.default)
def _clone(func, args, kwargs):
    return args[0]._with(lambda t: t.clone())


@_implements(aten.t.default)
def _t(func, args, kwargs):
    w = args[0]
    return w._with(lambda t: t, transposed=not w.transposed)


@_implements(aten.transpose.int)
def _transpose(func, args, kwargs):
    w, d0, d1 = args[0], args[1] % 2, args[2] % 2
    return w._with(lambda t: t, transposed=w.transposed ^ (d0 != d1))


@_implements(aten.permute.default)
def _permute(func, args, kwargs):
    w, dims = args[0], [d % 2 for d in args[1]]
    return w._with(lambda t: t, transposed=w.transposed ^ (dims == [1, 0]))


@_implements(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    w = args[0]
    dtype, device = kwargs.get("dtype"), kwargs.get("device")
    if dtype is not None and dtype != w.dtype and dtype not in DTYPE_CODES:
        raise TypeError(f"a vnm.VNMWeight holds float32, float16 or bfloat16 values, not {dtype}: cast the "
                        "model to one of those, or take a dense copy with weight.to_dense()")
    if kwargs.get("layout") not in (None, torch.strided) or kwargs.get("memory_format") not in \
            (None, torch.preserve_format, torch.contiguous_format):
        raise NotImplementedError("vnm.VNMWeight converts dtype and device only; take weight.to_dense() first")
    moved = w.vnm.to(device, dtype)  # values cast (with an overflow check), indices moved
    out = VNMWeight.from_vnm_tensor(moved)
    return out if not w.transposed else out._with(lambda t: t, transposed=True)


def _check_plain(x, what: str) -> torch.Tensor:
    if isinstance(x, VNMWeight):
        raise NotImplementedError(f"a product of two vnm.VNMWeight tensors ({what}): take weight.to_dense() of one")
    return x


@_implements(aten.mm.default)
def _mm(func, args, kwargs):
    a, b = args
    if isinstance(b, VNMWeight):
        x = _check_plain(a, "mm")
        if b.transposed:  # x @ W.T: the layer's product
            return b.linear(x)
        return x @ b._dense_op().to(x.dtype)  # x @ W (backward of x @ W.T): densify once
    w = a
    x = _check_plain(b, "mm")
    if not w.transposed:  # W @ x = (x.T @ W.T).T
        return w.linear(x.T).T
    return w._dense_op().T.to(x.dtype) @ x  # W.T @ x


@_implements(aten.addmm.default)
def _addmm(func, args, kwargs):
    c, a, b = args
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if isinstance(c, VNMWeight):
        raise NotImplementedError("addmm with a vnm.VNMWeight as the added term: take weight.to_dense() first")
    if beta == 1 and alpha == 1 and isinstance(b, VNMWeight) and b.transposed and not isinstance(a, VNMWeight) \
            and c.dim() == 1 and c.shape[0] == b.R and c.dtype == a.dtype:
        return b.linear(a, c)  # bias + x @ W.T: the bias goes into the kernel's epilogue
    return beta * c + alpha * _mm(aten.mm.default, (a, b), {})


@_implements(aten.linear.default)
def _linear(func, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if isinstance(w, VNMWeight) and not w.transposed and not isinstance(x, VNMWeight):
        return w.linear(x, bias)
    raise NotImplementedError("linear with a transposed vnm.VNMWeight: pass the weight itself (F.linear(x, w))")


__all__ = ["VNMWeight"]
