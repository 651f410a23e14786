"""Pruning scores: the importance of every weight of a layer, from the weight and the statistics
of the layer's input channels (:class:`vnm.calibration.ChannelStats`).

Every score has the signature ``score(weight, stats=None, *, layer=None, **options) -> Tensor``:
``weight`` is the R x K matrix (output x input features; use :func:`vnm.layers.weight_matrix`
for GPT-2 ``Conv1D``), ``stats`` the layer's input statistics (``None`` only for
:func:`magnitude`), ``layer`` a name used in error messages. The result is an R x K float32
tensor on the weight's device, finite and non-negative, ready for :func:`vnm.select_mask`.

``vnm.scores.get(name)`` returns a score by name; ``vnm.scores.names()`` lists them.

==============  ==============================================================  ===============
name            S_ij                                                            source
==============  ==============================================================  ===============
``magnitude``   |W_ij|                                                          -
``wanda``       |W_ij| * ||X_j||_2                                              Sun et al. 2023
``ria``         (|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j||_2^a   Zhang et al. 2024
``entropy``     |W_ij| * (H_j + alpha * rms(X_j))        [reconstruction]       Li et al. 2023
``obs``         W_ij^2 / [H_F^-1]_jj  (mask only; see :mod:`vnm.obs`)           Frantar 2023
==============  ==============================================================  ===============

``obs`` needs the layer's Hessian (``vnm.calibrate(..., hessian=True)``). It is the mask-only
form of the second-order pruner ``vnm.sparsify(..., SparsifyConfig(score='sparsegpt'))``, which
also updates the kept weights (:func:`vnm.obs.obs_prune`).

Within one layer these scores are only compared with each other, so a positive factor common to
the whole layer (e.g. Wanda's reference code divides the squared norm by the number of
sequences) changes no mask; ``||X_j||_2`` here is the norm over all calibration tokens.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from .calibration import ChannelStats

Score = Callable[..., torch.Tensor]


def _where(layer: Optional[str], stats: Optional[ChannelStats] = None) -> str:
    name = layer if layer is not None else (stats.name if stats is not None else None)
    return f"layer {name!r}" if name else "this layer"


def _check_weight(weight: torch.Tensor, layer: Optional[str]) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight of {_where(layer)} must be a non-empty 2-D R x K matrix, got shape {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight of {_where(layer)} must be floating point, got {weight.dtype}")
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"the weight of {_where(layer)} holds NaN/Inf values; it cannot be scored")
    return w


def _require_stats(score: str, stats: Optional[ChannelStats], weight: torch.Tensor, layer: Optional[str]) -> ChannelStats:
    if stats is None:
        raise ValueError(
            f"score {score!r} needs the input statistics of {_where(layer)}, but none were given: run "
            "stats = vnm.calibrate(model, batches) and pass stats[name] (or use score 'magnitude')"
        )
    if not isinstance(stats, ChannelStats):
        raise TypeError(f"stats must be a vnm.ChannelStats (an entry of vnm.calibrate(...)), got {type(stats).__name__}")
    K = weight.shape[1]
    if stats.K != K:
        raise ValueError(
            f"the input statistics of {_where(layer, stats)} have {stats.K} channels but the weight has "
            f"K={K} input features (shape {tuple(weight.shape)}); pass the R x K weight "
            "(vnm.layers.weight_matrix(module) transposes GPT-2 Conv1D) and the stats of the same layer"
        )
    if stats.count <= 0:
        raise ValueError(
            f"the input statistics of {_where(layer, stats)} saw no tokens (the layer did not run during "
            "calibration); calibrate with batches that reach it"
        )
    return stats


def _finite_channels(v: torch.Tensor, what: str, score: str, stats: ChannelStats, layer: Optional[str]) -> torch.Tensor:
    if not bool(torch.isfinite(v).all()):
        bad = int((~torch.isfinite(v)).nonzero()[0])
        raise ValueError(
            f"the input statistics of {_where(layer, stats)} hold NaN/Inf ({what} of channel {bad} is "
            f"{float(v[bad])}); score {score!r} cannot use them: recalibrate (check the model's "
            "activations for overflow, e.g. in float16)"
        )
    return v


def _l2(score: str, stats: ChannelStats, layer: Optional[str], device) -> torch.Tensor:
    return _finite_channels(stats.l2, "||X_j||_2", score, stats, layer).to(device)


def magnitude(weight: torch.Tensor, stats: Optional[ChannelStats] = None, *, layer: Optional[str] = None) -> torch.Tensor:
    """S_ij = |W_ij|. Needs no statistics (``stats`` is ignored)."""
    return _check_weight(weight, layer).abs()


def wanda(weight: torch.Tensor, stats: Optional[ChannelStats], *, layer: Optional[str] = None) -> torch.Tensor:
    """Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
    arXiv 2306.11695; code locuslab/wanda ``lib/prune.py``): S_ij = |W_ij| * ||X_j||_2, the weight
    magnitude times the L2 norm of input channel j over the calibration tokens."""
    w = _check_weight(weight, layer)
    st = _require_stats("wanda", stats, w, layer)
    return w.abs() * _l2("wanda", st, layer, w.device)[None, :]


def ria(weight: torch.Tensor, stats: Optional[ChannelStats], *, a: float = 0.5, layer: Optional[str] = None) -> torch.Tensor:
    """Relative importance and activation (Zhang et al., "Plug-and-Play: An Efficient
    Post-training Pruning Method for Large Language Models", ICLR 2024; code
    biomedical-cybernetics/Relative-importance-and-activation-pruning ``lib/prune.py``)::

        S_ij = ( |W_ij| / sum_i |W_ij|  +  |W_ij| / sum_j |W_ij| ) * ||X_j||_2 ** a

    The first sum runs over the output rows (the column of input channel j), the second over the
    input channels (the row of output i). ``a = 0.5`` is the reference code's default. A row or
    column whose weights are all zero contributes 0 (not 0/0).
    """
    if not isinstance(a, (int, float)) or not (a >= 0):
        raise ValueError(f"ria exponent a must be a non-negative number, got {a!r}")
    w = _check_weight(weight, layer)
    st = _require_stats("ria", stats, w, layer)
    aw = w.abs()
    col = aw.sum(dim=0, keepdim=True)  # (1, K): sum over outputs i for each input channel j
    row = aw.sum(dim=1, keepdim=True)  # (R, 1): sum over inputs j for each output i
    rel = aw / torch.where(col > 0, col, 1.0) + aw / torch.where(row > 0, row, 1.0)
    return rel * _l2("ria", st, layer, w.device).pow(a)[None, :]


def entropy(weight: torch.Tensor, stats: Optional[ChannelStats], *, alpha: float = 1.0,
            layer: Optional[str] = None) -> torch.Tensor:
    """Entropy-weighted score after E-Sparse (Li et al., "E-Sparse: Boosting the Large Language
    Model Inference through Entropy-based N:M Sparsity", arXiv 2310.15929)::

        S_ij = |W_ij| * ( H_j + alpha * rms(X_j) )

    ``H_j`` is the Shannon entropy (nats) of input channel j's calibration activations,
    estimated from a histogram with ``stats.bins`` equal-width bins spanning the channel's
    observed range (:attr:`ChannelStats.entropy`); ``rms(X_j) = ||X_j||_2 / sqrt(tokens)``.

    Sourcing, precisely: the paper's abstract (read) says the information entropy of each
    channel of the hidden-state features is introduced "to enhance the significance of parameter
    weights and input feature norms" and that pruning is one-shot N:M without weight updates;
    that much is confirmed. The paper's body (its exact metric, entropy estimator, bin count and
    amplification factor) could not be read, and no public implementation was found. The form
    above, the histogram estimator, the use of the RMS (so that ``alpha`` does not depend on
    how many calibration tokens were used), ``alpha = 1`` and the default bin count are this
    library's reconstruction, not the paper's confirmed formula. Treat results as "entropy-
    weighted Wanda", and tune ``alpha`` / ``bins`` if you need to match the paper. With the
    default ``alpha = 1`` the entropy term (a few nats, similar for every channel) outweighs the
    RMS, so masks come out close to magnitude masks: on all-MiniLM-L6-v2, 95.98 % of the 2:4 mask
    entries agree with those of :func:`magnitude` (docs/scores.md has the command).
    """
    if not isinstance(alpha, (int, float)) or not (alpha >= 0):
        raise ValueError(f"entropy alpha must be a non-negative number, got {alpha!r}")
    w = _check_weight(weight, layer)
    st = _require_stats("entropy", stats, w, layer)
    h = st.entropy
    if h is None:
        raise ValueError(
            f"the input statistics of {_where(layer, st)} have no activation histogram, which score "
            "'entropy' needs: calibrate with entropy_bins set (the default), e.g. vnm.calibrate(model, "
            "batches, entropy_bins=128)"
        )
    h = _finite_channels(h, "entropy", "entropy", st, layer)
    rms = _finite_channels(st.rms, "rms", "entropy", st, layer)
    channel = (h + alpha * rms).to(w.device)
    return w.abs() * channel[None, :]


def obs(weight: torch.Tensor, stats: Optional[ChannelStats], *, dampening: float = 0.01,
        layer: Optional[str] = None) -> torch.Tensor:
    """The optimal-brain-surgeon saliency without weight updates, S_ij = W_ij^2 / U_jj^2 with U the
    upper Cholesky factor of the dampened inverse Hessian (:func:`vnm.obs.obs_saliency`).
    ``select_mask`` of it is the mask :func:`vnm.obs.obs_prune` chooses with ``update=False``."""
    from .obs import obs_saliency  # noqa: PLC0415

    w = _check_weight(weight, layer)
    st = _require_stats("obs", stats, w, layer)
    if st.hessian is None:
        raise ValueError(f"score 'obs' needs the input Hessian of {_where(layer, st)}: calibrate with "
                         "vnm.calibrate(model, batches, hessian=True)")
    return obs_saliency(w, st.hessian, dampening, layer).to(w.device)


_REGISTRY: Dict[str, Score] = {
    "magnitude": magnitude,
    "wanda": wanda,
    "ria": ria,
    "entropy": entropy,
    "obs": obs,
}

# Scores that read input statistics (all but magnitude).
NEEDS_STATS = frozenset({"wanda", "ria", "entropy", "obs"})
# Scores that read the input Hessian (calibrate with hessian=True).
NEEDS_HESSIAN = frozenset({"obs"})


def names() -> List[str]:
    """Names of the registered scores."""
    return list(_REGISTRY)


def get(name) -> Score:
    """The score function called ``name`` (or ``name`` itself if it is already callable)."""
    if callable(name):
        return name
    if not isinstance(name, str):
        raise TypeError(f"score must be a name ({', '.join(_REGISTRY)}) or a callable, got {type(name).__name__}")
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown score {name!r}; available: {', '.join(_REGISTRY)}") from None


def needs_stats(name) -> bool:
    """Whether the score reads input statistics (custom callables are assumed to)."""
    return not isinstance(name, str) or name.lower() in NEEDS_STATS


__all__ = ["magnitude", "wanda", "ria", "entropy", "obs", "get", "names", "needs_stats", "NEEDS_STATS",
           "NEEDS_HESSIAN"]
