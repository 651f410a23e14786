"""``VNMLinear``: an ``nn.Linear`` whose ``weight`` is a :class:`vnm.weight.VNMWeight`.

It replaces ``nn.Linear`` (and Hugging Face GPT-2's ``Conv1D``, whose weight is stored transposed)
in a model. It *is* an ``nn.Linear`` (``isinstance`` holds, ``in_features`` / ``out_features`` /
``weight`` / ``bias`` are there), so code written for dense layers keeps working: its weight
answers ``dtype``, ``shape``, ``device`` and ``.to()`` like a dense weight while holding only the
V:N:M storage, and ``nn.Linear.forward`` (``F.linear``) runs :func:`vnm.spmm` through it (the
``mma.sp`` kernel on a GPU, the C++ reference on the CPU). See ``docs/sparse_weight.md``.

The state dict holds the canonical arrays (``values``, ``meta``, ``columns``, optional ``perm`` and
``row_perm``, then ``bias``), not a ``weight`` entry: the same keys as before the weight became a
tensor, so checkpoints written by :func:`vnm.save` are unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .cuda_ops import PackedVNM
from .layers import weight_matrix
from .mask import select_mask
from .pattern import PatternLike, as_pattern, require_compressible
from .tensor import VNMTensor, check_perm, check_row_perm
from .weight import VNMWeight

_STATE_KEYS = ("values", "meta", "columns", "perm", "row_perm")


class VNMLinear(nn.Linear):
    """``y = x @ W.T + bias`` with W (out_features x in_features) in V:N:M storage.

    Build one with :meth:`from_linear` (or :meth:`from_tensor` around existing storage). With
    ``perm`` the stored matrix multiplies ``x[..., perm]`` (an input permutation no producer could
    absorb); with ``row_perm`` stored row r is written to output feature ``row_perm[r]`` (an output
    permutation no consumer could absorb, undone where the output is written). ``bias`` is in
    output order. ``weight`` is a frozen ``nn.Parameter`` holding a :class:`~vnm.weight.VNMWeight`
    whose value is the effective W, permutations included.
    """

    def __init__(self, in_features: int, out_features: int, pattern: PatternLike, bias: bool = True,
                 has_perm: bool = False, dtype: torch.dtype = torch.float32, device=None,
                 has_row_perm: bool = False):
        # Not nn.Linear.__init__: it would allocate (and initialise) a dense weight.
        nn.Module.__init__(self)
        p = require_compressible(as_pattern(pattern))
        # Well-formed all-zero storage (a zero matrix compressed), to be filled by load_state_dict.
        empty = VNMTensor.from_dense(torch.zeros(out_features, in_features, dtype=dtype),
                                     torch.zeros(out_features, in_features, dtype=torch.bool), p,
                                     perm=torch.arange(in_features) if has_perm else None,
                                     row_perm=torch.arange(out_features) if has_row_perm else None)
        self._init_from(empty.to(device), None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))

    def _init_from(self, weight: VNMTensor, bias: Optional[torch.Tensor]) -> None:
        R, K = weight.shape
        self.in_features, self.out_features = K, R
        self.pattern = weight.pattern
        self.pattern_text = weight.pattern_text  # read by forward paths, not the nanobind Pattern (torch.compile)
        self.weight = nn.Parameter(VNMWeight.from_vnm_tensor(weight), requires_grad=False)
        if bias is not None:
            if tuple(bias.shape) != (R,):
                raise ValueError(f"bias must have shape ({R},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.to(device=weight.device, dtype=weight.dtype).clone())
        else:
            self.register_parameter("bias", None)

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
        if not isinstance(weight, VNMTensor):
            raise TypeError(f"VNMLinear.from_tensor takes a vnm.VNMTensor, got {type(weight).__name__}")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m._init_from(weight, bias)
        return m

    # ---- the storage, as before the weight became a tensor ---------------------------------------
    # Read-only views of the weight's arrays: the weight tensor is the one owner.

    @property
    def values(self) -> torch.Tensor:
        return self.weight.values

    @property
    def meta(self) -> torch.Tensor:
        return self.weight.meta

    @property
    def columns(self) -> torch.Tensor:
        return self.weight.columns

    @property
    def perm(self) -> Optional[torch.Tensor]:
        return self.weight.perm

    @property
    def row_perm(self) -> Optional[torch.Tensor]:
        return self.weight.row_perm

    @property
    def weight_vnm(self) -> VNMTensor:
        """The compressed weight as a :class:`VNMTensor` (shares storage with the module)."""
        return self.weight.vnm

    @property
    def _packed(self) -> Optional[PackedVNM]:
        """The packed (``mma.sp`` kernel) layout the weight holds on a CUDA device in float16 /
        bfloat16 (None otherwise). It is built whenever the weight lands there (``.cuda()``,
        ``.to()``, ``.half()``, ``load_state_dict``), never inside forward, so forward stays
        traceable and graph-capturable. On a GPU both forms are held, about twice the weight
        storage (a packed-only mode is future work)."""
        return self.weight.packed()

    @_packed.setter
    def _packed(self, packed: Optional[PackedVNM]) -> None:
        arrays = self.weight._arrays()
        arrays.update(packed_values=None if packed is None else packed.values,
                      packed_meta=None if packed is None else packed.meta,
                      packed_kidx=None if packed is None else packed.kidx)
        w = self.weight
        self.weight = nn.Parameter(VNMWeight(arrays, w.pattern_text, w.R, w.K), requires_grad=False)

    def dense_weight(self) -> torch.Tensor:
        """The effective dense weight: ``x @ dense_weight().T`` equals this layer (without bias)."""
        return self.weight.to_dense()

    def to_linear(self) -> nn.Linear:
        """An equivalent dense ``nn.Linear`` (pruned weights are zeros)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def reset_parameters(self) -> None:
        raise NotImplementedError("a VNMLinear holds pruned, compressed weights: re-initialising them makes no sense; "
                                  "build a dense nn.Linear (layer.to_linear()) to train from scratch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.linear(x, self.bias)

    # ---- state dict: the canonical arrays, as vnm.save writes them -------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for key in _STATE_KEYS:
            t = getattr(self.weight, key)
            if t is not None:
                destination[prefix + key] = t if keep_vars else t.detach()
        extra = prefix + nn.modules.module._EXTRA_STATE_KEY_SUFFIX
        if getattr(self.__class__, "get_extra_state", nn.Module.get_extra_state) is not nn.Module.get_extra_state:
            destination[extra] = self.get_extra_state()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        w = self.weight
        wanted = [k for k in _STATE_KEYS if getattr(w, k) is not None]
        if self.bias is not None:
            wanted.append("bias")
        present = [k for k in wanted if prefix + k in state_dict]
        if strict:
            missing_keys.extend(prefix + k for k in wanted if k not in present)
            local = set(_STATE_KEYS) | {"bias"}
            for key in state_dict:
                if key.startswith(prefix):
                    head = key[len(prefix):].split(".", 1)[0]
                    if head not in local and head not in self._modules:
                        unexpected_keys.append(key)
                    elif head in _STATE_KEYS and getattr(w, head) is None:
                        unexpected_keys.append(key)  # e.g. a perm the layer was not built with
        storage = [k for k in present if k != "bias"]
        if storage:
            if len(storage) < len([k for k in wanted if k != "bias"]):
                error_msgs.append(f"{prefix or 'VNMLinear'}: the state dict has {storage} but the layer stores "
                                  f"{[k for k in wanted if k != 'bias']}: all or none of them")
                return
            arrays = {k: state_dict[prefix + k] for k in storage}
            try:
                t = VNMTensor(arrays["values"], arrays["meta"], arrays["columns"], self.pattern, (w.R, w.K),
                              arrays.get("perm"), row_perm=arrays.get("row_perm"))
                # like copying into buffers: the layer keeps its device and dtype
                t = t.to(w.device, w.dtype)
            except (ValueError, TypeError) as exc:
                error_msgs.append(f"{prefix or 'VNMLinear'}: {exc}")
                return
            self.weight = nn.Parameter(VNMWeight.from_vnm_tensor(t), requires_grad=False)
        if "bias" in present:
            b = state_dict[prefix + "bias"]
            if tuple(b.shape) != tuple(self.bias.shape):
                error_msgs.append(f"size mismatch for {prefix}bias: copying a param with shape {tuple(b.shape)}, "
                                  f"the layer has {tuple(self.bias.shape)}")
            else:
                with torch.no_grad():
                    self.bias.copy_(b)

    @property
    def nbytes(self) -> int:
        """Bytes of the weight storage (without the bias)."""
        return self.weight.storage_nbytes

    def extra_repr(self) -> str:
        dense = self.in_features * self.out_features * self.values.element_size()
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern_text}, "
                f"sparsity={self.pattern.sparsity:.3f}, bias={self.bias is not None}, "
                f"perm={self.perm is not None}, row_perm={self.row_perm is not None}, "
                f"storage={self.nbytes / dense:.3f} of dense")
