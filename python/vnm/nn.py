"""``VNMLinear``: a linear layer that holds only V:N:M compressed storage.

It replaces ``nn.Linear`` (and Hugging Face GPT-2's ``Conv1D``, whose weight is stored transposed)
in a model; its forward runs :func:`vnm.spmm` (the ``mma.sp`` kernel on a GPU, the C++ reference
on the CPU). The canonical arrays are buffers, so ``state_dict``, ``.to()``, ``.half()`` and
``torch.compile`` work as for any module.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layers import weight_matrix
from .mask import select_mask
from .ops import check_spmm_inputs, spmm_storage
from .pattern import PatternLike, as_pattern, require_compressible
from .tensor import VNMTensor, check_perm, check_row_perm


class VNMLinear(nn.Module):
    """``y = x @ W.T + bias`` with W (out_features x in_features) in V:N:M storage.

    Build one with :meth:`from_linear`. With ``perm`` the stored matrix multiplies
    ``x[..., perm]`` (an input permutation no producer could absorb); with ``row_perm`` stored row
    r is written to output feature ``row_perm[r]`` (an output permutation no consumer could absorb,
    undone where the output is written). ``bias`` is in output order.
    """

    def __init__(self, in_features: int, out_features: int, pattern: PatternLike, bias: bool = True,
                 has_perm: bool = False, dtype: torch.dtype = torch.float32, device=None,
                 has_row_perm: bool = False):
        super().__init__()
        p = require_compressible(as_pattern(pattern))
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.pattern = p
        self.pattern_text = str(p)  # forward reads this, not the nanobind Pattern (torch.compile)
        # Well-formed all-zero storage (a zero matrix compressed), to be filled by load_state_dict.
        empty = VNMTensor.from_dense(torch.zeros(out_features, in_features, dtype=dtype),
                                     torch.zeros(out_features, in_features, dtype=torch.bool), p)
        self.register_buffer("values", empty.values.to(device))
        self.register_buffer("meta", empty.meta.to(device))
        self.register_buffer("columns", empty.columns.to(device))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device) if has_perm else None)
        self.register_buffer("row_perm",
                             torch.arange(out_features, dtype=torch.int32, device=device) if has_row_perm else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._refresh_packed()

    @classmethod
    def from_linear(cls, linear: nn.Module, mask: Optional[torch.Tensor] = None, pattern: PatternLike = "2:4",
                    perm: Optional[torch.Tensor] = None, row_perm: Optional[torch.Tensor] = None) -> "VNMLinear":
        """Compress an ``nn.Linear`` (or ``Conv1D``).

        ``mask`` (out x in, bool) says which weights to keep; without one the mask keeping the most
        magnitude is selected. With ``perm`` the layer computes ``x[..., perm] @ W[:, perm].T``: the
        same function, with columns regrouped. With ``row_perm`` it stores ``W[row_perm]`` and
        writes stored row r to output ``row_perm[r]``: the same function, with rows regrouped.
        ``mask`` is a mask of the stored matrix ``W[row_perm][:, perm]``.
        """
        weight = weight_matrix(linear).detach()
        out_features, in_features = weight.shape
        if perm is not None:
            perm = check_perm(perm, in_features).to(weight.device)
            weight = weight[:, perm.long()]
        if row_perm is not None:
            row_perm = check_row_perm(row_perm, out_features).to(weight.device)
            weight = weight[row_perm.long()]
        if mask is None:
            mask = select_mask(weight.float().abs(), pattern)
        t = VNMTensor.from_dense(weight, mask, pattern, perm=perm, row_perm=row_perm)
        bias = getattr(linear, "bias", None)
        return cls.from_tensor(t, None if bias is None else bias.detach())

    @classmethod
    def from_tensor(cls, weight: VNMTensor, bias: Optional[torch.Tensor] = None) -> "VNMLinear":
        """A layer around existing compressed storage (shared, not copied)."""
        R, K = weight.shape
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = K, R
        m.pattern, m.pattern_text = weight.pattern, weight.pattern_text
        m.register_buffer("values", weight.values)
        m.register_buffer("meta", weight.meta)
        m.register_buffer("columns", weight.columns)
        m.register_buffer("perm", weight.perm)
        m.register_buffer("row_perm", weight.row_perm)
        if bias is not None:
            if tuple(bias.shape) != (R,):
                raise ValueError(f"bias must have shape ({R},), got {tuple(bias.shape)}")
            m.bias = nn.Parameter(bias.to(device=weight.device, dtype=weight.dtype).clone())
        else:
            m.bias = None
        m._refresh_packed()
        return m

    @property
    def weight_vnm(self) -> VNMTensor:
        """The compressed weight as a :class:`VNMTensor` (shares storage with the module)."""
        return VNMTensor(self.values, self.meta, self.columns, self.pattern, (self.out_features, self.in_features),
                         self.perm, row_perm=self.row_perm, validate=False)

    def dense_weight(self) -> torch.Tensor:
        """The effective dense weight: ``x @ dense_weight().T`` equals this layer (without bias)."""
        return self.weight_vnm.effective_dense()

    def to_linear(self) -> nn.Linear:
        """An equivalent dense ``nn.Linear`` (pruned weights are zeros)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # ---- the packed (kernel) form on CUDA ------------------------------------------------------
    # On a GPU the mma.sp kernel reads a packed layout (vnm.cuda_ops). It is built whenever the
    # storage lands on a CUDA device in a kernel dtype (module.cuda(), .to(), .half(),
    # load_state_dict), never inside forward, so forward stays traceable and graph-capturable.
    # The canonical buffers stay the module's state (state_dict, save); on a GPU both forms are
    # held, about twice the weight storage (a packed-only mode is future work).

    def _refresh_packed(self) -> None:
        self._packed = None
        if self.values.is_cuda and self.values.dtype in (torch.float16, torch.bfloat16):
            from . import cuda_ops  # noqa: PLC0415

            self._packed = cuda_ops.pack(self.weight_vnm)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._refresh_packed()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh_packed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = getattr(self, "_packed", None)
        if x.is_cuda and packed is not None:
            check_spmm_inputs(x, self.values, self.bias, self.out_features, self.in_features)
            lead = x.shape[:-1]
            y = torch.ops.vnm.spmm_packed(x.reshape(-1, self.in_features).contiguous(), packed.values, packed.meta,
                                          packed.kidx, packed.rows, self.bias, self.pattern_text,
                                          self.out_features, self.in_features, self.perm is not None)
            return y.reshape(*lead, self.out_features)
        return spmm_storage(x, self.values, self.meta, self.columns, self.perm, self.row_perm, self.bias,
                            self.pattern_text, self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        """Bytes of the weight storage (without the bias)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.values, self.meta, self.columns, self.perm, self.row_perm) if t is not None)

    def extra_repr(self) -> str:
        dense = self.in_features * self.out_features * self.values.element_size()
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern_text}, "
                f"sparsity={self.pattern.sparsity:.3f}, bias={self.bias is not None}, "
                f"perm={self.perm is not None}, row_perm={self.row_perm is not None}, "
                f"storage={self.nbytes / dense:.3f} of dense")

