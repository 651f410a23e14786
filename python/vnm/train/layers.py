"""Which linear layers a recovery method wraps, and ``merge``: folding trained wrappers into
:class:`vnm.nn.VNMLinear`.

Layer choice follows :func:`vnm.sparsify` (the same skip globs, ``filter_fn`` and padding rule),
except that plain N:M patterns such as ``4:8`` are allowed here: they can be trained, but
:func:`merge` turns them into masked dense ``nn.Linear`` layers because only V:N:M and 2:4 have
compressed storage.
"""

from __future__ import annotations

from typing import Callable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..layers import weight_matrix
from ..nn import VNMLinear
from ..pattern import Pattern, PatternLike, as_pattern
from ..sparsify import DEFAULT_SKIP, SparsifyConfig, _set_module, find_layers

PatternSpec = Union[PatternLike, Mapping[str, PatternLike]]
# A mask score: (weight R x K, layer name) -> non-negative scores R x K. None means |weight|.
MaskScore = Callable[[torch.Tensor, str], torch.Tensor]


def choose_layers(model: nn.Module, pattern: PatternSpec, skip: Sequence[str] = DEFAULT_SKIP,
                  filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> List[Tuple[str, Pattern]]:
    """(name, pattern) of every linear layer of ``model`` a recovery method should wrap: the
    layers :func:`vnm.sparsify` would prune (same skip globs, ``filter_fn``, padding rule), plain
    N:M patterns included.

    Raises ``ValueError`` when none qualifies, naming why each linear layer was left out.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = SparsifyConfig(pattern=pattern, skip=tuple(skip))
    reports = find_layers(model, config, filter_fn, compressed_only=False)
    chosen = [(r.name, as_pattern(r.pattern)) for r in reports if r.pattern is not None]
    if not chosen:
        why = "; ".join(f"{r.name}: {r.skipped}" for r in reports) or "the model has no nn.Linear or Conv1D layer"
        raise ValueError(f"no layer of {type(model).__name__} can be trained sparse: {why}")
    return chosen


def frozen_copy(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=False)


def linear_parts(module: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight as out x in, bias) of an nn.Linear or a GPT-2 Conv1D, detached."""
    w = weight_matrix(module).detach()
    b = getattr(module, "bias", None)
    return w.contiguous(), None if b is None else b.detach()


def select_scores(score: Optional[MaskScore], weight: torch.Tensor, name: str) -> torch.Tensor:
    """Scores for mask selection from ``weight`` (detached): |weight| or ``score(weight, name)``."""
    w = weight.detach()
    s = w.float().abs() if score is None else score(w, name)
    if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(w.shape):
        raise ValueError(f"mask score for {name} must return a tensor of shape {tuple(w.shape)}, "
                         f"got {getattr(s, 'shape', type(s).__name__)}")
    return s


def sparse_layer(weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor,
                 pattern: Pattern) -> nn.Module:
    """``VNMLinear`` keeping ``weight`` where ``mask`` is set (a masked ``nn.Linear`` for plain
    N:M patterns, which have no compressed storage)."""
    weight = weight.detach()
    if pattern.compressible:
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
        return VNMLinear.from_linear(lin, mask, pattern)
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)))
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def merge(model: nn.Module) -> nn.Module:
    """Fold every recovery wrapper of ``model`` (in place) into an inference layer and return it.

    :class:`~vnm.train.LoRASparseLinear` becomes ``VNMLinear`` holding ``(W + scale B A) * mask``
    (no LoRA left at inference); :class:`~vnm.train.SRSTELinear` becomes ``VNMLinear`` holding
    ``W * mask(|W|)``. A LoRA layer that never left the dense stage gets its mask selected now
    from ``W + scale B A`` with the score its training used (``ThreeStageConfig.mask_score``,
    which :class:`~vnm.train.ThreeStageLoRA` stores on the layer; magnitude when there was none).
    Plain N:M patterns (no compressed storage) become masked ``nn.Linear``. Raises
    ``ValueError`` when the model has no wrapper.
    """
    wrappers = [(n, m) for n, m in model.named_modules() if hasattr(m, "merged_parts")]
    if not wrappers:
        raise ValueError(f"{type(model).__name__} has no LoRASparseLinear or SRSTELinear layer to merge: "
                         "prepare it with vnm.train.prepare_lora or vnm.train.prepare_srste first")
    for name, module in wrappers:
        weight, bias, mask = module.merged_parts()
        new = sparse_layer(weight, bias, mask, module.pattern)
        new.train(module.training)
        if name:
            _set_module(model, name, new)
        else:
            model = new
    return model


__all__ = ["choose_layers", "merge", "MaskScore", "PatternSpec"]
