"""Model-level pruning: score every prunable layer, select masks, apply them in place.

    stats = vnm.calibrate(model, batches)
    masks = vnm.compute_masks(model, "64:2:8", "wanda", stats)   # {name: bool R x K}
    vnm.apply_masks_(model, masks)                                # W <- W * mask

Masks are R x K (output x input features) for every layer, GPT-2 ``Conv1D`` included.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from . import scores as _scores
from .layers import LayerFilter, prunable_layers, weight_matrix
from .mask import select_mask
from .pattern import PatternLike, as_pattern


def layer_scores(
    model: nn.Module,
    score="magnitude",
    stats: Optional[Mapping] = None,
    layers: LayerFilter = None,
    *,
    progress: bool = False,
    **score_options,
) -> Dict[str, torch.Tensor]:
    """``{name: R x K float32 scores}`` of the model's prunable layers (see :mod:`vnm.scores`).

    ``stats`` is the :func:`vnm.calibrate` result; scores other than ``magnitude`` need an entry
    for every scored layer, else ``ValueError`` names the first layer without one.
    """
    fn = _scores.get(score)
    modules = prunable_layers(model, layers)
    if not modules:
        raise ValueError("no prunable layers selected (the model has no nn.Linear / Conv1D, or `layers` matched none)")
    if _scores.needs_stats(score):
        if stats is None:
            raise ValueError(f"score {score!r} needs input statistics: run stats = vnm.calibrate(model, batches) "
                             "and pass stats=stats")
        missing = [n for n in modules if stats.get(n) is None]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(
                f"layer {missing[0]!r}{more} has no input statistics, which score {score!r} needs: "
                "run vnm.calibrate(model, batches) over a model containing these layers (without a "
                "`layers` filter that leaves them out), or restrict `layers`"
            )
    out = {}
    for name, m in tqdm(modules.items(), desc=f"scores ({score if isinstance(score, str) else 'custom'})",
                        disable=not progress, leave=False):
        st = stats.get(name) if stats is not None else None
        out[name] = fn(weight_matrix(m), st, layer=name, **score_options)
    return out


def compute_masks(
    model: nn.Module,
    pattern: PatternLike,
    score="magnitude",
    stats: Optional[Mapping] = None,
    layers: LayerFilter = None,
    *,
    backend: str = "auto",
    progress: bool = True,
    **score_options,
) -> Dict[str, torch.Tensor]:
    """``{name: bool R x K mask}`` keeping the most ``score`` under ``pattern`` in every selected
    layer (exact selection, :func:`vnm.select_mask`). Nothing is modified."""
    p = as_pattern(pattern)
    sc = layer_scores(model, score, stats, layers, **score_options)
    return {name: select_mask(s, p, backend=backend)
            for name, s in tqdm(sc.items(), desc=f"masks {p}", disable=not progress, leave=False)}


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Multiply each named layer's weight by its R x K mask, in place; returns the model."""
    modules = prunable_layers(model, list(masks))
    for name, mask in masks.items():
        w = weight_matrix(modules[name])
        if tuple(mask.shape) != tuple(w.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)} but the layer's R x K weight is {tuple(w.shape)}")
        w.mul_(mask.to(device=w.device, dtype=w.dtype))
    return model


def kept_fraction(scores: torch.Tensor, mask: torch.Tensor) -> float:
    """Kept importance: sum of ``scores`` where ``mask`` keeps / sum of all ``scores`` (float64).
    1.0 for an all-zero score matrix (nothing to lose)."""
    s = scores.detach().double()
    total = float(s.sum())
    if total <= 0:
        return 1.0
    return float((s * mask.to(s.device)).sum()) / total


__all__ = ["layer_scores", "compute_masks", "apply_masks_", "kept_fraction"]
