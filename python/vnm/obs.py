"""Second-order one-shot pruning with weight updates (optimal brain surgeon, swept as SparseGPT
does), for V:N:M, N:M and unstructured sparsity.

Every score in :mod:`vnm.scores` picks a mask and stops: the kept weights are never corrected.
Here the weights that survive absorb the error of the ones pruned. For one layer with weight W
(R x K) and calibration inputs X (n tokens x K), each row w of W is pruned to minimise the layer's
output error ``||X w - X w'||^2``, whose Hessian is the same for every row::

    H = 2 X^T X / n  +  lambda I,      lambda = dampening * mean(diag(2 X^T X / n))

(``dampening`` = 0.01 by default, SparseGPT's ``percdamp``). Removing weight j of a row and
letting the weights F of the row that are still free absorb it (optimal brain surgeon) costs
``w_j^2 / [H_F^-1]_jj`` and moves them by ``-w_j / [H_F^-1]_jj * [H_F^-1]_{j,F}``.

The sweep (Frantar & Alistarh 2023, "SparseGPT", section 3): columns are processed left to right,
so after column j the free set is always F = {j+1, ..., K-1}; the rows ``[H_F^-1]_{j,F}`` for all
j at once are the rows of the upper Cholesky factor U of H^-1 (``H^-1 = U^T U``) scaled by
``1 / U_jj``, so one Cholesky gives every update. Columns go through in blocks of ``block_size``
(a multiple of M) whose updates are applied to the columns to the right in one product (the lazy
batch update; same result, fewer passes over W); inside a block the same is done per group of M
columns (column by column within the group, the rest of the block once per group).

The mask is chosen inside the sweep. When the sweep reaches the first column of a group of M
columns, the group's saliency ``w_ij^2 / U_jj^2`` (with the row's weights as updated so far) is
handed to :func:`vnm.select_mask` with the pattern: for V:N:M that is, exactly, per V x M block
the 4 columns with the largest summed saliency and then per row the 2 of those 4 with the largest
saliency; for N:M the N largest of each row's M. Unstructured sparsity chooses, in each block of
columns, the least salient ``sparsity`` fraction of the block's weights (``unstructured='layer'``,
SparseGPT's rule) or of each row's (``'row'``).

Choices stated: the Hessian is accumulated in float64 (see :func:`vnm.calibrate`), inverted and
factored in float64, and the sweep runs in float32 (the weights' precision on the CPU and
SparseGPT's choice; float64 doubles its cost and changed no mask in our checks). Input channels
that never carried a non-zero value (``H_jj = 0``, "dead") are handled as SparseGPT does: their
diagonal is set to 1 and their weights to 0 before the sweep (they cannot affect the output).
``update=False`` runs the same sweep without any weight update, so its masks are those of the
mask-only score :func:`obs_saliency` (``vnm.scores.get('obs')``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn

from .layers import prunable_layers, weight_matrix
from .mask import select_mask
from .pattern import Pattern, PatternLike, as_pattern

DEFAULT_DAMPENING = 0.01
DEFAULT_BLOCK_SIZE = 128


@dataclass
class ObsResult:
    """What :func:`obs_prune` returns: the pruned weight (R x K, zeros where pruned, in the input
    weight's dtype) and the keep mask (R x K bool), plus the layer's squared-error proxy
    ``sum_j (w_j - q_j)^2 / U_jj^2`` over the sweep (SparseGPT's reported loss)."""

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float


def _check_hessian(hessian: torch.Tensor, K: int, layer: Optional[str]) -> torch.Tensor:
    where = f"layer {layer!r}" if layer else "this layer"
    if not isinstance(hessian, torch.Tensor) or hessian.dim() != 2 or tuple(hessian.shape) != (K, K):
        raise ValueError(f"the Hessian of {where} must be a {K} x {K} tensor (K = the weight's input features), got "
                         f"{tuple(getattr(hessian, 'shape', ()))}: pass stats[name].hessian from "
                         "vnm.calibrate(model, batches, hessian=True)")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"the Hessian of {where} holds NaN/Inf: the calibration activations overflow; recalibrate "
                         "in float32")
    return hessian


def inverse_hessian_cholesky(hessian: torch.Tensor, dampening: float = DEFAULT_DAMPENING,
                             layer: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): the upper Cholesky factor of ``(H + lambda I)^-1`` (float64) and the mask of dead
    input channels (``H_jj == 0``), whose diagonal was set to 1 first (see the module doc)."""
    if not dampening >= 0:
        raise ValueError(f"dampening must be >= 0 (a fraction of the mean Hessian diagonal), got {dampening!r}")
    H = hessian.detach().to(torch.float64).clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0
    mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    diag += dampening * mean
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        where = f"layer {layer!r}" if layer else "this layer"
        raise ValueError(f"the dampened Hessian of {where} is not positive definite (dampening={dampening}): raise "
                         "the dampening (e.g. 0.1) or calibrate on more tokens")
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)
    return U, dead


def obs_saliency(weight: torch.Tensor, hessian: torch.Tensor, dampening: float = DEFAULT_DAMPENING,
                 layer: Optional[str] = None) -> torch.Tensor:
    """The OBS saliency ``w_ij^2 / U_jj^2`` of every weight before any update (R x K float32):
    ``U_jj^2 = [H_F^-1]_jj`` with F the columns j.. of the sweep. The masks
    :func:`obs_prune` chooses with ``update=False`` are ``select_mask`` of these scores; with the
    update on, it is also what permutation search ranks."""
    w = weight.detach().to(torch.float64)
    U, dead = inverse_hessian_cholesky(_check_hessian(hessian, w.shape[1], layer), dampening, layer)
    w = w.masked_fill(dead[None, :], 0.0)
    return (w.pow(2) / torch.diagonal(U).pow(2)[None, :]).float()


def _choose_group_mask(saliency: torch.Tensor, pattern: Optional[Pattern], sparsity: Optional[float],
                       unstructured: str) -> torch.Tensor:
    """Keep mask of one group of columns (R x width) from its saliency."""
    if pattern is not None:
        return select_mask(saliency, pattern)
    if unstructured == "row":
        prune = int(round(saliency.shape[1] * sparsity))
        keep = torch.ones_like(saliency, dtype=torch.bool)
        if prune:
            idx = torch.topk(saliency, prune, dim=1, largest=False).indices
            keep.scatter_(1, idx, False)
        return keep
    prune = int(round(saliency.numel() * sparsity))
    keep = torch.ones_like(saliency, dtype=torch.bool)
    if prune:
        idx = torch.topk(saliency.reshape(-1), prune, largest=False).indices
        keep.view(-1)[idx] = False
    return keep


def obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Optional[PatternLike] = None,
    *,
    sparsity: Optional[float] = None,
    unstructured: str = "layer",
    update: bool = True,
    dampening: float = DEFAULT_DAMPENING,
    block_size: int = DEFAULT_BLOCK_SIZE,
    layer: Optional[str] = None,
) -> ObsResult:
    """Prune one layer's weight (R x K) with the second-order sweep of the module doc.

    ``hessian``: ``H = 2 X^T X / n`` (K x K) of the layer's inputs, e.g.
    ``vnm.calibrate(model, batches, hessian=True)[name].hessian``. Give ``pattern`` (V:N:M such
    as '64:2:8', or N:M such as '2:4', '4:8') or, for unstructured sparsity, ``sparsity`` (the
    fraction pruned) with ``unstructured='layer'`` (SparseGPT: per block of columns, the
    least salient weights of the whole block) or ``'row'`` (the same fraction in every row).
    ``update=False``: choose the masks in the sweep but never change a weight (mask only).
    ``block_size``: columns per lazy batch update, rounded up to a multiple of the pattern's M.

    Returns an :class:`ObsResult`; the weight is in the input's dtype and device. The masks pass
    :func:`vnm.check_mask` for the pattern (columns and rows that are not multiples of M or V are
    padded with zero saliency by ``select_mask`` and cropped, as everywhere in vnm).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be a floating-point R x K matrix, got {getattr(weight, 'shape', type(weight))}")
    if (pattern is None) == (sparsity is None):
        raise ValueError("give exactly one of pattern (e.g. '64:2:8', '2:4') and sparsity (a fraction in (0, 1) "
                         "for unstructured pruning)")
    p = None if pattern is None else as_pattern(pattern)
    if sparsity is not None and not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a fraction in [0, 1), got {sparsity!r}")
    if unstructured not in ("layer", "row"):
        raise ValueError(f"unstructured must be 'layer' or 'row', got {unstructured!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    R, K = weight.shape
    U, dead = inverse_hessian_cholesky(_check_hessian(hessian, K, layer), dampening, layer)
    group = p.M if p is not None else block_size
    block = -(-block_size // group) * group

    device = weight.device
    W = weight.detach().to(torch.float32).clone()
    W[:, dead.to(device)] = 0.0
    U = U.to(device=device, dtype=torch.float32)
    d = torch.diagonal(U)
    keep = torch.ones(R, K, dtype=torch.bool, device=device)
    zero = torch.zeros((), dtype=W.dtype, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        W1 = W[:, b0:b1].clone()
        U1 = U[b0:b1, b0:b1]
        d1 = d[b0:b1]
        Err1 = torch.zeros_like(W1)
        for g0 in range(0, b1 - b0, group):
            g1 = min(g0 + group, b1 - b0)
            # The group's mask, from the saliency of its weights as updated so far.
            saliency = W1[:, g0:g1].pow(2) / d1[g0:g1].pow(2)[None, :]
            keep[:, b0 + g0:b0 + g1] = _choose_group_mask(saliency, p, sparsity, unstructured)
            group_keep = keep[:, b0 + g0:b0 + g1]
            for i in range(g0, g1):
                w = W1[:, i]
                q = torch.where(group_keep[:, i - g0], w, zero)
                err = (w - q) / d1[i]
                if update:  # within the group column by column; the rest of the block once per group
                    W1[:, i:g1] -= err[:, None] * U1[i, i:g1][None, :]
                W1[:, i] = q
                Err1[:, i] = err
            if update and g1 < b1 - b0:
                W1[:, g1:] -= Err1[:, g0:g1] @ U1[g0:g1, g1:]
        loss += Err1.double().pow(2).sum()
        W[:, b0:b1] = W1
        if update and b1 < K:
            W[:, b1:] -= Err1 @ U[b0:b1, b1:]
    return ObsResult(W.to(weight.dtype), keep, float(loss) / 2)


# ---- a whole model, block by block --------------------------------------------------------------


def find_blocks(model: nn.Module) -> Tuple[str, List[nn.Module]]:
    """(name, blocks) of the model's stack of transformer blocks: the longest ``nn.ModuleList``
    whose every entry holds a prunable layer (``model.layers`` of LLaMA / Mistral / Qwen2,
    ``transformer.h`` of GPT-2, ``encoder.layer`` of BERT and ViT). ``ValueError`` if none."""
    best: Optional[Tuple[str, nn.ModuleList]] = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and all(prunable_layers(b) for b in m):
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks holding linear layers: pass the "
                         "transformer blocks yourself (blocks=model.model.layers)")
    return best[0], list(best[1])


class LayerPlan(Protocol):
    """A permutation plan for one layer (see :func:`prune_sequential`'s ``plan_fn``)."""

    row_perm: Optional[torch.Tensor]
    col_perm: Optional[torch.Tensor]


PlanFn = Callable[[Dict[str, str], Dict[str, torch.Tensor]], Mapping[str, LayerPlan]]


@dataclass
class SequentialResult:
    """What :func:`prune_sequential` returns, per pruned layer (full module names): the keep masks
    (R x K bool, in the layer's own row and column order, CPU), the saliency each layer's mask
    and permutation search started from (:func:`obs_saliency`, on the weights as they came into
    the block), the plans ``plan_fn`` returned (empty without one) and the sweep's loss."""

    masks: Dict[str, torch.Tensor]
    saliency: Dict[str, torch.Tensor]
    plans: Dict[str, LayerPlan]
    loss: Dict[str, float]


def _permute(t: torch.Tensor, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]) -> torch.Tensor:
    if rows is not None:
        t = t[rows.to(t.device)]
    if cols is not None:
        t = t[:, cols.to(t.device)]
    return t


def _unpermute(t: torch.Tensor, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]) -> torch.Tensor:
    out = t
    if cols is not None:
        out = torch.empty_like(t)
        out[:, cols.to(t.device)] = t
        t = out
    if rows is not None:
        out = torch.empty_like(t)
        out[rows.to(t.device)] = t
    return out


def prune_sequential(
    model: nn.Module,
    batches: Iterable,
    patterns: Mapping[str, Optional[PatternLike]],
    *,
    sparsity: Optional[float] = None,
    unstructured: str = "layer",
    update: bool = True,
    dampening: float = DEFAULT_DAMPENING,
    block_size: int = DEFAULT_BLOCK_SIZE,
    blocks: Optional[Sequence[nn.Module]] = None,
    plan_fn: Optional[PlanFn] = None,
    token_mask=None,
    progress: bool = True,
) -> SequentialResult:
    """Prune a model's layers in place with :func:`obs_prune`, block by block (as SparseGPT runs
    LLMs): each block's layers are calibrated on what the already pruned blocks before it output
    (:func:`vnm.calibrate_sequential` with ``hessian=True``), pruned, and the block's outputs
    recomputed with the pruned weights for the next block. Memory: the block inputs of every
    calibration batch plus the Hessians of one block's layers (K^2 float64 each).

    ``patterns``: ``{module name: pattern}`` of the layers to prune (every one inside a block);
    with ``sparsity`` set instead (unstructured), the values are ignored (use None). ``blocks``:
    the transformer blocks in execution order (default :func:`find_blocks`). The pruned weights are
    written into the model's layers (zeros where pruned), which stay dense modules: apply the
    masks with :func:`vnm.sparsify` (``score='sparsegpt'`` does all of this) or hand them to
    recovery training (``vnm.train.prepare_lora(model, pattern, masks=result.masks)``).

    ``plan_fn(block_patterns, saliency) -> {name: plan}`` (optional; :func:`vnm.sparsify` passes
    its permutation planner) is called once per block with the block's saliencies; a layer whose
    plan has ``row_perm`` / ``col_perm`` is pruned in that order (its Hessian permuted alike), so
    the mask has the pattern's structure in the permuted order. Weights and masks are written back
    in the layer's own order.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    from .calibration import calibrate_sequential  # noqa: PLC0415

    if sparsity is None:
        patterns = {n: as_pattern(p) for n, p in patterns.items()}
    if not patterns:
        raise ValueError("patterns is empty: name the layers to prune ({module name: pattern})")
    if blocks is None:
        _, blocks = find_blocks(model)
    names_of = {id(m): n for n, m in model.named_modules()}
    prefixes = [names_of.get(id(b)) for b in blocks]
    inside = [n for n in patterns if any(p is not None and n.startswith(p + ".") for p in prefixes)]
    outside = [n for n in patterns if n not in inside]
    if outside:
        raise ValueError(f"layer {outside[0]!r} ({len(outside)} in all) is outside the transformer blocks, so "
                         "sequential pruning never calibrates it: leave it dense (e.g. SparsifyConfig(skip=...)) or "
                         "prune it with a mask-only score")
    result = SequentialResult({}, {}, {}, {})

    def prune_block(block: nn.Module, stats) -> None:
        names = [n for n in stats if n in patterns]
        saliency = {n: obs_saliency(weight_matrix(model.get_submodule(n)), stats[n].hessian, dampening, n).cpu()
                    for n in names}
        result.saliency.update(saliency)
        plans = dict(plan_fn({n: str(patterns[n]) for n in names}, saliency)) if plan_fn is not None else {}
        result.plans.update(plans)
        for n in tqdm(names, desc="obs: layers", disable=not progress, leave=False):
            module = model.get_submodule(n)
            plan = plans.get(n)
            rows = None if plan is None else plan.row_perm
            cols = None if plan is None else plan.col_perm
            weight = weight_matrix(module)
            H = stats[n].hessian
            if cols is not None:
                H = H[cols.to(H.device)][:, cols.to(H.device)]
            pruned = obs_prune(_permute(weight.detach(), rows, cols), H, None if sparsity is not None else patterns[n],
                               sparsity=sparsity, unstructured=unstructured, update=update, dampening=dampening,
                               block_size=block_size, layer=n)
            with torch.no_grad():
                weight.copy_(_unpermute(pruned.weight, rows, cols))
            result.masks[n] = _unpermute(pruned.mask, rows, cols).cpu()
            result.loss[n] = pruned.loss

    calibrate_sequential(model, batches, blocks, prune_block, entropy_bins=None, token_mask=token_mask,
                         progress=progress, hessian=True)
    missing = [n for n in patterns if n not in result.masks]
    if missing:
        raise ValueError(f"layer {missing[0]!r} never ran during calibration (it is in a block, but the calibration "
                         "batches do not reach it): calibrate with batches that do, or leave it dense")
    return result


def is_obs_method(score) -> bool:
    """Whether a SparsifyConfig score names the second-order pruner (``'sparsegpt'``)."""
    return isinstance(score, str) and score.lower() == "sparsegpt"


__all__ = ["obs_prune", "obs_saliency", "inverse_hessian_cholesky", "ObsResult", "prune_sequential",
           "SequentialResult", "find_blocks", "DEFAULT_DAMPENING", "DEFAULT_BLOCK_SIZE", "is_obs_method"]
