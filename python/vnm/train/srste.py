"""SR-STE: sparse-refined straight-through estimation (Zhou et al., ICLR 2021, "Learning N:M
fine-grained structured sparse neural networks from scratch"; code ``aojunzz/NM-sparsity``,
``devkit/sparse_ops/sparse_ops.py``), here for N:M and V:N:M masks.

Every training forward selects the mask from the current dense weight
(``vnm.select_mask(|W|, pattern)``) and uses ``W * mask``. The backward passes the gradient of the
masked weight straight through to the dense weight and adds the sparse-refined term on the pruned
weights::

    grad_W = dL/d(W * mask) + lambda_w * (1 - mask) * W

so one SGD step is ``W <- W - lr * (g + lambda_w * (1 - mask) * W)``. Sourced from the reference
code: the rule, the mask recomputed at every iteration and ``lambda_w = 2e-4`` (its default
``decay``). Its training recipe (SGD, momentum 0.9, lr 0.1, cosine; ResNet-50 from scratch) is not
the default here: fine-tuning a trained transformer, SGD at lr 1e-2 diverged on our digits ViT
(``examples/digits_vit_recovery.py``), so :class:`SRSTEConfig` defaults to AdamW at lr 1e-4 with a
cosine schedule (ours). With AdamW the SR-STE term is part of the gradient Adam normalises, so the
update is no longer the SGD rule above; ``optimizer='sgd'`` gives exactly that rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..mask import select_mask
from ..pattern import Pattern, PatternLike, as_pattern
from ..sparsify import DEFAULT_SKIP, _set_module
from .layers import PatternSpec, choose_layers, linear_parts
from .loop import ForwardFn, LossFn, Schedule, TrainConfig, TrainLog, train_loop

SRSTE_DECAY = 2e-4  # lambda_w, the reference code's default


class SRSTEFunction(torch.autograd.Function):
    """``weight * mask`` forward; backward ``grad + decay * (1 - mask) * weight`` to ``weight``."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        pruned = torch.where(mask, torch.zeros((), dtype=weight.dtype, device=weight.device), weight)
        return grad + ctx.decay * pruned, None, None


def srste_weight(weight: torch.Tensor, mask: torch.Tensor, decay: float = SRSTE_DECAY) -> torch.Tensor:
    """The masked weight, with SR-STE's gradient to the dense ``weight``."""
    if mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(f"mask must be a bool tensor of the weight's shape {tuple(weight.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    return SRSTEFunction.apply(weight, mask, float(decay))


class SRSTELinear(nn.Module):
    """``y = x @ (W * mask).T + bias`` with the mask selected from ``|W|``, trained with
    :class:`SRSTEFunction`'s gradient.

    Every forward that may be trained on (training mode, or autograd enabled) selects the mask
    afresh, as the reference code does. A cache keyed on the weight's version counter would go
    stale: fused optimisers (``AdamW(fused=True)``) and writes through ``weight.data`` change the
    weight without bumping it. Only evaluation forwards (eval mode under ``torch.no_grad``) reuse
    the last mask while the weight's version and storage are unchanged, so there a write through
    ``weight.data`` is seen only after ``train()`` / ``eval()`` (which drop the cache) or
    :meth:`current_mask`. ``weight`` and ``bias`` are trainable copies of the wrapped layer's.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], pattern: PatternLike,
                 decay: float = SRSTE_DECAY):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out x in), got shape {tuple(weight.shape)}")
        if decay < 0:
            raise ValueError(f"decay (lambda_w) must be >= 0, got {decay}")
        self.pattern: Pattern = as_pattern(pattern)
        self.out_features, self.in_features = weight.shape
        self.decay = float(decay)
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        # Derived from the weight, so not saved; rebuilt on the first forward after a load.
        self.register_buffer("mask", torch.ones_like(weight, dtype=torch.bool), persistent=False)
        self._mask_key: Optional[Tuple[int, int, torch.device]] = None

    @classmethod
    def from_linear(cls, module: nn.Module, pattern: PatternLike, decay: float = SRSTE_DECAY) -> "SRSTELinear":
        w, b = linear_parts(module)
        return cls(w, b, pattern, decay)

    def _weight_key(self) -> Tuple[int, int, torch.device]:
        return (self.weight._version, self.weight.data_ptr(), self.weight.device)

    def current_mask(self) -> torch.Tensor:
        """The mask of the current weight, selected now (and kept as ``self.mask``)."""
        self.mask = select_mask(self.weight.detach().float().abs(), self.pattern)
        self._mask_key = self._weight_key()
        return self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evaluating = not self.training and not torch.is_grad_enabled()
        if evaluating and self._mask_key == self._weight_key() and self.mask.shape == self.weight.shape:
            mask = self.mask
        else:
            mask = self.current_mask()
        return F.linear(x, srste_weight(self.weight, mask, self.decay), self.bias)

    def train(self, mode: bool = True) -> "SRSTELinear":
        self._mask_key = None  # the evaluation cache never outlives a mode switch
        return super().train(mode)

    def merged_parts(self):
        """(weight, bias, mask) for :func:`vnm.train.merge`: the dense weight and its mask."""
        return self.weight.detach(), None if self.bias is None else self.bias.detach(), self.current_mask().clone()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
                f"decay={self.decay:g}")


def prepare_srste(model: nn.Module, pattern: PatternSpec = "2:4", decay: float = SRSTE_DECAY,
                  skip: Sequence[str] = DEFAULT_SKIP,
                  filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> List[str]:
    """Replace the linear layers of ``model`` (in place) with :class:`SRSTELinear`; layers are
    chosen as :func:`vnm.sparsify` chooses them. Nothing is frozen (SR-STE trains all weights).
    Returns the wrapped layer names."""
    chosen = choose_layers(model, pattern, skip, filter_fn)
    for name, p in chosen:
        _set_module(model, name, SRSTELinear.from_linear(model.get_submodule(name), p, decay))
    return [name for name, _ in chosen]


@dataclass
class SRSTEConfig(TrainConfig):
    """SR-STE fine-tuning (plus everything in :class:`TrainConfig`).

    steps: optimiser steps. Defaults (ours, for fine-tuning a trained model): AdamW at lr 1e-4,
    cosine schedule, no warm-up; ``optimizer='sgd'`` (momentum 0.9) is the reference recipe's
    optimiser. The decay ``lambda_w`` is set per layer by :func:`prepare_srste` (default 2e-4,
    the reference's).
    """

    steps: int = 0
    optimizer: str = "adamw"
    lr: float = 1e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 0

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"SRSTEConfig needs steps >= 1 (the number of optimiser steps), got {self.steps!r}")


class SRSTESchedule(Schedule):
    """Logs how many mask entries changed since the previous step (masks follow the weights)."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, SRSTELinear)]
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no SRSTELinear layer: call vnm.train.prepare_srste first")
        # The masks the previous step's forward used; None where unknown (first step of a run,
        # also of a resumed one: masks are derived from the weights, not saved).
        self.previous: List[Optional[torch.Tensor]] = [None] * len(self.layers)

    def begin_step(self, step: int) -> Dict[str, Any]:
        return {"stage": "srste"}

    def end_step(self, step: int, row: Dict[str, Any]) -> Dict[str, Any]:
        # m.mask is the mask this step's forward selected; the optimiser step since has not
        # touched it. Comparing it costs no extra selection.
        known = all(p is not None for p in self.previous)
        flips = sum(int((m.mask != p).sum()) for m, p in zip(self.layers, self.previous)) if known else ""
        self.previous = [m.mask for m in self.layers]
        return {"mask_flips": flips}


def train_srste(model: nn.Module, batches, config: SRSTEConfig, loss_fn: Optional[LossFn] = None,
                forward_fn: Optional[ForwardFn] = None) -> TrainLog:
    """SR-STE fine-tuning of a model prepared with :func:`prepare_srste`; returns the log.
    ``batches``, ``loss_fn`` and distillation as in :func:`vnm.train.train_three_stage`; then
    :func:`vnm.train.merge`."""
    if not isinstance(config, SRSTEConfig):
        raise TypeError(f"config must be an SRSTEConfig, got {type(config).__name__}")
    config.validate()
    return train_loop(model, batches, config.steps, config, SRSTESchedule(model), loss_fn, forward_fn, desc="SR-STE")


__all__ = ["SRSTEFunction", "srste_weight", "SRSTELinear", "prepare_srste", "SRSTEConfig", "train_srste",
           "SRSTE_DECAY"]
