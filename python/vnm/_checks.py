"""Input checks shared by the public functions: each error names what was expected and the fix."""

from __future__ import annotations

from typing import Optional

import torch

# dtype codes of the C++ core (vnm::DType)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_code(dtype: torch.dtype, what: str) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(
            f"{what} has dtype {dtype}; vnm supports torch.float32, torch.float16 and torch.bfloat16"
        ) from None


def raw_bits(t: torch.Tensor) -> torch.Tensor:
    """Contiguous CPU view of a float tensor as raw bits (what the C++ core takes)."""
    t = t.contiguous()
    if t.dtype == torch.float32:
        return t
    return t.view(torch.int16)


def require_tensor(x, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    return x


def require_2d(t: torch.Tensor, what: str) -> torch.Tensor:
    require_tensor(t, what)
    if t.dim() != 2:
        raise ValueError(f"{what} must be 2-D (rows x columns), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{what} must not be empty, got shape {tuple(t.shape)}")
    return t


def check_spmm_inputs(x: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor], R: int, K: int) -> None:
    """The checks on what a user passes to a sparse product (x, bias) against an R x K weight whose
    values are ``values``. Plain torch attribute reads: traceable by ``torch.compile``."""
    require_tensor(x, "x")
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(
            f"x has shape {tuple(x.shape)}: its last dimension must be K={K} (the weight's input features)"
        )
    dtype_code(x.dtype, "x")
    if x.dtype != values.dtype:
        raise TypeError(f"x is {x.dtype} but the weight is {values.dtype}; cast x with x.to({values.dtype})")
    if x.device != values.device:
        raise ValueError(f"x is on {x.device} but the weight is on {values.device}; move one with .to()")
    if bias is not None:
        require_tensor(bias, "bias")
        if tuple(bias.shape) != (R,):
            raise ValueError(f"bias must have shape ({R},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias is {bias.dtype} but x is {x.dtype}; cast it with bias.to({x.dtype})")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
